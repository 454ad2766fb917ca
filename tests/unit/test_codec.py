"""Codec: single-object framing, fingerprints, schema evolution both ways."""

from __future__ import annotations

import copy
import io
import json
import struct
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from schemas.codec import AVRO_DIR, HEADER_LEN, MAGIC, Codec, SchemaRegistry, crc64_avro, default_codec, fingerprint
from schemas.errors import DecodeError, TokenRelayError
from schemas.ids import new_request_id
from schemas.records import (
    Accepted,
    ChatMessage,
    ControlEvent,
    Deleted,
    Delta,
    Failed,
    Finished,
    InferenceRequest,
    Started,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)

RID = "01890a5d-ac96-774b-bcce-b302099a8057"


def _event(payload: object, seq: int = 0) -> TokenEvent:
    return TokenEvent(RID, "run-1", seq, 1_700_000_000_000, payload)  # type: ignore[arg-type]


RECORDS = [
    InferenceRequest(RID, "hello", 16),
    InferenceRequest(
        RID,
        "",
        8,
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        stop=("\n", "END"),
        seed=7,
        messages=(ChatMessage("system", "be brief"), ChatMessage("user", "héllo 世界 🙂")),
        model="default",
        deadline_ms=1_800_000_000_000,
        tenant="team-a",
        created_ms=1_700_000_000_000,
    ),
    _event(Started("w1", "default", 5, 12)),
    _event(Started("w2", "default", 5, 12, continues_run_id="run-0", continued_tokens=3)),
    _event(Delta(" wörld 🙂", (1, 2, 3)), seq=1),
    _event(Finished("length", Usage(5, 16), ttft_ms=3, total_ms=40), seq=2),
    _event(Failed("deadline_exceeded", "too late", retriable=False), seq=1),
    ControlEvent(RID, "cancel", 1_700_000_000_000, reason="client_disconnected"),
    # v3 / v5 fields: sampling options, structured output, tools, logprobs, choices, Responses state, deletion.
    InferenceRequest(
        RID,
        "",
        8,
        messages=(
            ChatMessage("user", "weather?"),
            ChatMessage("assistant", "", tool_calls='[{"id":"c1"}]'),
            ChatMessage("tool", "sunny", tool_call_id="c1", name="get_weather"),
        ),
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.2,
        min_p=0.05,
        logit_bias={"17": -100.0, "3": 2.5},
        n=3,
        logprobs=True,
        top_logprobs=2,
        response_format='{"type":"json_object"}',
        tools='[{"type":"function","function":{"name":"get_weather"}}]',
        tool_choice='"auto"',
    ),
    _event(
        Delta(
            "ab",
            (4, 5),
            index=2,
            logprobs=(
                TokenLogprob(4, -0.25, (TopLogprob(4, -0.25, b"ab"), TopLogprob(9, -2.0, b"\xe6")), b"ab"),
                TokenLogprob(5, -1.5),
            ),
        ),
        seq=1,
    ),
    _event(Finished("stop", Usage(5, 6), choice_finish_reasons=("stop", "length"), tool_calls="[]"), seq=2),
    TokenEvent(RID, "", 0, 1, Accepted("m", response='{"instructions":"hi"}', input_items="[]")),
    TokenEvent(RID, "", 0, 1, Deleted("team-a")),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(record: object) -> None:
    codec = default_codec()
    data = codec.encode(record)  # type: ignore[arg-type]
    assert data[:2] == MAGIC
    assert codec.decode(data) == record


def test_crc64_matches_fastavro() -> None:
    for path in AVRO_DIR.glob("*.avsc"):
        schema = json.loads(path.read_text())
        canonical = to_parsing_canonical_form(schema)
        ours = crc64_avro(canonical.encode())
        # fastavro gives the fingerprint as hex of its little-endian bytes, as framed on the wire.
        assert struct.pack("<Q", ours).hex() == fastavro_fingerprint(canonical, "CRC-64-AVRO")


def test_crc64_of_spec_examples() -> None:
    # The fingerprint of the primitive schema "int" from the Avro spec's test vectors.
    assert struct.pack("<Q", crc64_avro(b'"int"')).hex() == "8f5c393f1ad57572"


def test_plain_fastavro_reads_codec_output_with_avsc_alone() -> None:
    record = RECORDS[1]
    assert isinstance(record, InferenceRequest)
    data = default_codec().encode(record)
    schema = json.loads((AVRO_DIR / "InferenceRequest.v3.avsc").read_text())
    # The spec's framing: 2-byte marker, 8-byte little-endian CRC-64-AVRO, then the body.
    assert data[:2] == b"\xc3\x01"
    assert data[2:10].hex() == fastavro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    body = fastavro.schemaless_reader(io.BytesIO(data[10:]), fastavro.parse_schema(schema))
    assert isinstance(body, dict)
    assert body["prompt"] == ""
    assert body["messages"][1]["content"] == "héllo 世界 🙂"
    assert body["stop"] == ["\n", "END"]


def test_record_written_by_plain_fastavro_is_decoded() -> None:
    schema = json.loads((AVRO_DIR / "InferenceRequest.v1.avsc").read_text())
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + fingerprint(schema))
    minimal = {"request_id": RID, "prompt": "hi", "max_tokens": 3}
    full = {**_defaults(schema), **minimal}
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), full)
    assert default_codec().decode_request(buf.getvalue()) == InferenceRequest(RID, "hi", 3)


def _defaults(schema: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: f["default"] for f in schema["fields"] if "default" in f}


def _evolved_request_schema() -> dict[str, Any]:
    schema = copy.deepcopy(json.loads((AVRO_DIR / "InferenceRequest.v3.avsc").read_text()))
    schema["fields"].append({"name": "evolved", "type": "int", "default": 0, "doc": "added in v4"})
    return schema


def _registry_with(schema: dict[str, Any], version: int) -> SchemaRegistry:
    registry = SchemaRegistry(AVRO_DIR.glob("*.avsc"))
    registry.add(schema, version=version)
    return registry


def test_new_reader_reads_old_writer() -> None:
    """A newer reader fills the added field's default when reading a v1 record."""
    old = default_codec().encode(InferenceRequest(RID, "x", 4))
    new_codec = Codec(_registry_with(_evolved_request_schema(), version=4))
    name, value = new_codec.decode_dict(old)
    assert name == "InferenceRequest"
    assert value["evolved"] == 0
    assert value["prompt"] == "x"


def test_old_reader_reads_new_writer() -> None:
    """An older reader that knows the newer writer schema drops the field it does not know."""
    v2 = _evolved_request_schema()
    writer = Codec(_registry_with(v2, version=4))
    data = writer.encode_dict(
        "InferenceRequest", {**_defaults(v2), "request_id": RID, "prompt": "y", "max_tokens": 2, "evolved": 9}
    )
    # The old reader ships the newer schema among its known versions but still reads with its own.
    old_reader_registry = SchemaRegistry(AVRO_DIR.glob("*.avsc"))
    old_reader_registry.add(v2, version=0)
    assert Codec(old_reader_registry).decode_request(data) == InferenceRequest(RID, "y", 2)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc3",
        b"\xc3\x01\x00",
        b"{}",
        b"\xc3\x01" + b"\x00" * 8 + b"body",
        b"\xc3\x01" + fingerprint(json.loads((AVRO_DIR / "TokenEvent.v1.avsc").read_text())) + b"\xff\xff\xff",
    ],
)
def test_undecodable_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        default_codec().decode(data)
    assert isinstance(info.value, TokenRelayError)
    assert not info.value.retriable


def test_trailing_bytes_are_rejected() -> None:
    data = default_codec().encode(ControlEvent(RID, "cancel", 1))
    with pytest.raises(DecodeError, match="trailing"):
        default_codec().decode(data + b"\x00")


def test_expected_kind_is_enforced() -> None:
    data = default_codec().encode(ControlEvent(RID, "cancel", 1))
    with pytest.raises(DecodeError, match="expected a TokenEvent"):
        default_codec().decode_event(data)


def test_header_length_constant() -> None:
    data = default_codec().encode(InferenceRequest(new_request_id(), "p", 1))
    assert len(data) > HEADER_LEN


def test_records_of_the_previous_versions_read_with_the_new_defaults() -> None:
    """InferenceRequest v2 and TokenEvent v4 records (written before the sampling contract) decode with defaults."""
    for name, fields in (
        (
            "InferenceRequest.v2",
            {"request_id": RID, "prompt": "p", "max_tokens": 3, "messages": [{"role": "user", "content": "c"}]},
        ),
        (
            "TokenEvent.v4",
            {
                "request_id": RID,
                "run_id": "r",
                "seq": 1,
                "ts_ms": 2,
                "payload": ("io.tokenrelay.Delta", {"text": "t", "token_ids": [7]}),
            },
        ),
    ):
        schema = json.loads((AVRO_DIR / f"{name}.avsc").read_text())
        buf = io.BytesIO()
        buf.write(b"\xc3\x01" + fingerprint(schema))
        fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), {**_defaults(schema), **fields})
        record = default_codec().decode(buf.getvalue())
        if isinstance(record, InferenceRequest):
            assert record.n == 1 and record.logit_bias == {} and record.repetition_penalty == 1.0
            assert record.messages == (ChatMessage("user", "c"),)
        else:
            assert isinstance(record, TokenEvent)
            assert record.payload == Delta("t", (7,), index=0, logprobs=())

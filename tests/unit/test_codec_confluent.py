"""Codec: the Confluent wire format beside single-object encoding; both framings read by one codec."""

from __future__ import annotations

import contextlib
import io
import json
import struct

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import AVRO_DIR, Codec, default_codec, default_registry
from schemas.errors import ConfigError, DecodeError, SchemaUnavailable
from schemas.records import ControlEvent, Delta, Finished, InferenceRequest, Record, TokenEvent, Usage

RID = "01890a5d-ac96-774b-bcce-b302099a8057"
IDS = {"InferenceRequest": 11, "TokenEvent": 12, "ControlEvent": 13, "ModelInfo": 14}
RECORDS: list[Record] = [
    InferenceRequest(RID, "hello", 16, stop=("\n",), seed=3),
    TokenEvent(RID, "run-1", 0, 1_700_000_000_000, Delta(" wörld 🙂", (1, 2))),
    TokenEvent(RID, "run-1", 1, 1_700_000_000_001, Finished("length", Usage(5, 2), 3, 40)),
    ControlEvent(RID, "cancel", 1_700_000_000_000, reason="client_disconnected"),
]


def _registry_texts() -> dict[int, str]:
    """What a registry would answer for the ids above: the schemas as registered."""
    schemas = default_registry()
    return {schema_id: schemas.schema_json(name) for name, schema_id in IDS.items()}


def _writer() -> Codec:
    return Codec(schema_ids=IDS)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_confluent_framing_round_trips(record: Record) -> None:
    data = _writer().encode(record)
    name = type(record).__name__
    assert data[0] == 0 and struct.unpack(">I", data[1:5])[0] == IDS[name]
    assert _writer().decode(data) == record
    assert _writer().framing == "confluent" and default_codec().framing == "single-object"


def test_plain_fastavro_reads_the_body_after_five_bytes() -> None:
    data = _writer().encode(RECORDS[0])
    schema = json.loads((AVRO_DIR / "InferenceRequest.v3.avsc").read_text())
    body = fastavro.schemaless_reader(io.BytesIO(data[5:]), fastavro.parse_schema(schema))
    assert isinstance(body, dict)
    assert body["prompt"] == "hello" and body["stop"] == ["\n"]


def test_one_reader_reads_both_framings() -> None:
    texts = _registry_texts()
    asked: list[int] = []

    def resolve(schema_id: int) -> str:
        asked.append(schema_id)
        return texts[schema_id]

    reader = Codec(resolve=resolve)
    for record in RECORDS:
        assert reader.decode(_writer().encode(record)) == record
        assert reader.decode(default_codec().encode(record)) == record
    # Each id is asked once, then kept.
    assert sorted(asked) == sorted({IDS[type(r).__name__] for r in RECORDS})


def test_a_foreign_writer_schema_is_resolved_with_defaults() -> None:
    """A producer's own three-field schema, registered as another version: read with tokenrelay's defaults."""
    minimal = {
        "type": "record",
        "name": "InferenceRequest",
        "namespace": "io.tokenrelay",
        "fields": [
            {"name": "request_id", "type": "string"},
            {"name": "prompt", "type": "string"},
            {"name": "max_tokens", "type": "int"},
        ],
    }
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", 99))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(minimal), {"request_id": RID, "prompt": "p", "max_tokens": 4})
    reader = Codec(resolve={99: json.dumps(minimal)}.__getitem__)
    assert reader.decode_request(buf.getvalue()) == InferenceRequest(RID, "p", 4)


def test_unknown_ids_and_foreign_records_are_decode_errors() -> None:
    data = _writer().encode(RECORDS[3])
    with pytest.raises(DecodeError, match="no schema registry"):
        default_codec().decode(data)
    other = json.dumps({"type": "record", "name": "com.example.Other", "fields": [{"name": "x", "type": "int"}]})
    with pytest.raises(DecodeError, match="not one of tokenrelay's"):
        Codec(resolve=lambda _id: other).decode(data)
    with pytest.raises(DecodeError, match="not a usable Avro schema"):
        Codec(resolve=lambda _id: "{not json").decode(data)
    with pytest.raises(DecodeError, match="trailing"):
        _writer().decode(data + b"\x00")
    with pytest.raises(DecodeError, match="expected a TokenEvent"):
        _writer().decode_event(data)


def test_an_unreachable_registry_is_retriable() -> None:
    def down(schema_id: int) -> str:
        raise SchemaUnavailable(f"schema id {schema_id}: no answer")

    with pytest.raises(DecodeError) as info:
        Codec(resolve=down).decode(_writer().encode(RECORDS[0]))
    assert info.value.retriable


def test_encoding_a_record_without_an_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Codec(schema_ids={"TokenEvent": 1}).encode(RECORDS[3])


events = st.builds(
    TokenEvent,
    st.text(max_size=20),
    st.text(max_size=20),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.builds(Delta, st.text(max_size=30), st.lists(st.integers(0, 2**31 - 1), max_size=5).map(tuple)),
)


@given(events)
@settings(max_examples=200)
def test_every_event_round_trips_through_a_registry_reader(event: TokenEvent) -> None:
    reader = Codec(resolve=_registry_texts().__getitem__)
    assert reader.decode(_writer().encode(event)) == event


@given(st.integers(0, 2**32 - 1), st.binary(max_size=120))
@settings(max_examples=300)
def test_any_confluent_bytes_decode_or_raise_decode_error(schema_id: int, body: bytes) -> None:
    texts = _registry_texts()

    def resolve(sid: int) -> str:
        if sid not in texts:
            raise DecodeError(f"schema id {sid} is not in the schema registry")
        return texts[sid]

    data = b"\x00" + struct.pack(">I", schema_id) + body
    with contextlib.suppress(DecodeError):
        Codec(resolve=resolve).decode(data)
    known = b"\x00" + struct.pack(">I", IDS["TokenEvent"]) + body
    with contextlib.suppress(DecodeError):
        Codec(resolve=resolve).decode(known)

"""Property-based tests of the codec: any record round-trips; any bytes decode or raise DecodeError."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import MAGIC, default_codec
from schemas.errors import DecodeError
from schemas.records import (
    ChatMessage,
    ControlEvent,
    Delta,
    Failed,
    Finished,
    InferenceRequest,
    Started,
    TokenEvent,
    Usage,
)

text = st.text(max_size=40)
i32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)

requests = st.builds(
    InferenceRequest,
    request_id=text,
    prompt=text,
    max_tokens=i32,
    temperature=finite,
    top_p=finite,
    top_k=i32,
    stop=st.tuples(text) | st.just(()),
    seed=st.none() | i64,
    messages=st.none() | st.lists(st.builds(ChatMessage, text, text), max_size=3).map(tuple),
    model=text,
    deadline_ms=st.none() | i64,
    tenant=text,
    created_ms=st.none() | i64,
)
payloads = st.one_of(
    st.builds(Started, text, text, i32, i64, text, st.none() | text, i32, text),
    st.builds(Delta, text, st.lists(i32, max_size=8).map(tuple)),
    st.builds(Finished, st.sampled_from(["stop", "length", "cancelled"]), st.builds(Usage, i32, i32), i64, i64),
    st.builds(Failed, text, text, st.booleans()),
)
events = st.builds(TokenEvent, text, text, i64, i64, payloads)
controls = st.builds(ControlEvent, text, text, i64, text)


@given(st.one_of(requests, events, controls))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_every_record_round_trips(record: InferenceRequest | TokenEvent | ControlEvent) -> None:
    codec = default_codec()
    assert codec.decode(codec.encode(record)) == record


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        default_codec().decode(data)


@given(st.one_of(requests, events, controls), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_records_never_escape_decode_error(
    record: InferenceRequest | TokenEvent | ControlEvent, data: st.DataObject
) -> None:
    encoded = bytearray(default_codec().encode(record))
    # Keep the header so corruption reaches the body decoder, the hard part.
    index = data.draw(st.integers(min_value=len(MAGIC) + 8, max_value=len(encoded) - 1))
    encoded[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(min_value=len(MAGIC), max_value=len(encoded)))
    with contextlib.suppress(DecodeError):
        default_codec().decode(bytes(encoded[:cut]))

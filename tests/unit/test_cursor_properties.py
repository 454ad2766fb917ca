"""Property-based tests of SSE cursor parsing: any input is a Cursor or a CursorError, never another exception."""

from __future__ import annotations

import base64

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.fanout.cursor import MAX_CURSOR_CHARS, VERSION, Cursor, decode_cursor, encode_cursor, event_epoch
from schemas.errors import CursorError

cursors = st.builds(
    Cursor,
    epoch=st.integers(min_value=0, max_value=(1 << 16) - 1),
    partition=st.integers(min_value=0, max_value=(1 << 31) - 1),
    offset=st.integers(min_value=0, max_value=(1 << 63) - 1),
)
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _decode_or_error(text: str) -> Cursor | None:
    try:
        cursor = decode_cursor(text)
    except CursorError:
        return None
    # Whatever is accepted is canonical: it encodes back to exactly the text.
    assert encode_cursor(cursor) == text
    return cursor


@given(cursors)
def test_round_trip(cursor: Cursor) -> None:
    text = encode_cursor(cursor)
    assert len(text) <= MAX_CURSOR_CHARS
    assert set(text) <= set(B64)
    assert decode_cursor(text) == cursor


@given(st.text(max_size=80))
@example("")
@example("=")
@example("AQ")
@example("A" * (MAX_CURSOR_CHARS + 1))
@example("\x00\udcff")
def test_any_text_is_a_cursor_or_cursor_error(text: str) -> None:
    _decode_or_error(text)


@given(st.text(alphabet=B64, min_size=1, max_size=MAX_CURSOR_CHARS + 4))
def test_any_base64_text_is_a_cursor_or_cursor_error(text: str) -> None:
    _decode_or_error(text)


@given(st.binary(max_size=40))
@example(bytes([VERSION]) + b"\x00\x01" + b"\xff" * 12)  # overlong uvarint
@example(bytes([VERSION]) + b"\x00\x01\x80")  # truncated uvarint
@example(bytes([VERSION]) + b"\x00\x01\x80\x00\x00")  # non-minimal uvarint
@example(bytes([VERSION + 1]) + b"\x00\x01\x00\x00")  # unknown version
def test_any_bytes_behind_base64_are_a_cursor_or_cursor_error(raw: bytes) -> None:
    _decode_or_error(base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    _decode_or_error(base64.urlsafe_b64encode(raw).decode())  # with padding: never accepted as canonical


@given(cursors, st.integers(min_value=0, max_value=3), st.sampled_from(B64))
def test_single_character_mutations_never_decode_to_another_cursor_silently(
    cursor: Cursor, index: int, replacement: str
) -> None:
    text = encode_cursor(cursor)
    position = index % len(text)
    mutated = text[:position] + replacement + text[position + 1 :]
    decoded = _decode_or_error(mutated)
    if mutated == text:
        assert decoded == cursor
    elif decoded is not None:
        assert decoded != cursor  # a different text never names the same position


@given(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.integers(min_value=-(1 << 40), max_value=1 << 40),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
)
def test_encode_rejects_out_of_range_with_cursor_error(epoch: int, partition: int, offset: int) -> None:
    cursor = Cursor(epoch, partition, offset)
    try:
        text = encode_cursor(cursor)
    except CursorError:
        assert not (0 <= epoch < 1 << 16 and 0 <= partition < 1 << 31 and 0 <= offset < 1 << 63)
        return
    assert decode_cursor(text) == cursor


@given(st.text(max_size=40), st.text(max_size=40), st.integers(min_value=0, max_value=1 << 40))
def test_event_epoch_is_sixteen_bits_and_stable(request_id: str, run_id: str, seq: int) -> None:
    epoch = event_epoch(request_id, run_id, seq)
    assert 0 <= epoch < 1 << 16
    assert epoch == event_epoch(request_id, run_id, seq)

"""Unsigned LEB128 varints, as SSE cursors and the Kafka protocol's compact fields write them."""

from __future__ import annotations

MAX_SHIFT = 63


def encode_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it) of the varint at ``pos``; None when it is truncated or longer than 64 bits."""
    value = shift = 0
    while pos < len(data) and shift <= MAX_SHIFT:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None

"""Opaque SSE cursors: a check value, the partition and the offset of one event, URL-safe base64."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from schemas.errors import CursorError
from schemas.varint import decode_uvarint, encode_uvarint

VERSION = 1
MAX_CURSOR_CHARS = 40
_ALPHABET = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class Cursor:
    """Position of one SSE event: Kafka partition and offset, plus a 16-bit epoch check."""

    epoch: int
    partition: int
    offset: int


def event_epoch(request_id: str, run_id: str, seq: int) -> int:
    """16-bit check tying a cursor to the record it names.

    aiokafka does not expose topic ids, so instead of a topic epoch the cursor carries a hash of the identity
    of the event at its position: after the events topic is recreated, the record at that offset is not the
    same event, the check does not match, and the gateway answers with a ``reset`` instead of misreading it.
    """
    digest = hashlib.blake2b(f"{request_id}/{run_id}/{seq}".encode(), digest_size=2).digest()
    return int.from_bytes(digest, "big")


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    read = decode_uvarint(data, pos)
    if read is None:
        raise CursorError("truncated cursor")
    return read


def encode_cursor(cursor: Cursor) -> str:
    if not (0 <= cursor.epoch < 1 << 16 and 0 <= cursor.partition < 1 << 31 and 0 <= cursor.offset < 1 << 63):
        raise CursorError(f"cursor out of range: {cursor}")
    raw = (
        bytes([VERSION])
        + cursor.epoch.to_bytes(2, "big")
        + encode_uvarint(cursor.partition)
        + encode_uvarint(cursor.offset)
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str) -> Cursor:
    """Strict parse: only what encode_cursor produces is accepted."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_CURSOR_CHARS or not _ALPHABET.match(text):
        raise CursorError("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise CursorError("malformed cursor") from None
    if len(raw) < 5 or raw[0] != VERSION:
        raise CursorError("malformed cursor")
    epoch = int.from_bytes(raw[1:3], "big")
    partition, pos = _read_uvarint(raw, 3)
    offset, pos = _read_uvarint(raw, pos)
    if pos != len(raw) or partition >= 1 << 31 or offset >= 1 << 63:
        raise CursorError("malformed cursor")
    cursor = Cursor(epoch, partition, offset)
    if encode_cursor(cursor) != text:
        raise CursorError("malformed cursor")  # non-canonical spelling of a valid cursor
    return cursor


def decode_framed(text: bytes) -> Cursor:
    """Parse a cursor this project framed itself (another gateway's stream): no check of its spelling.

    Still raises CursorError on bytes that are not a cursor at all.
    """
    try:
        raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise CursorError("malformed cursor") from None
    if len(raw) < 5 or raw[0] != VERSION:
        raise CursorError("malformed cursor")
    partition, pos = _read_uvarint(raw, 3)
    offset, _ = _read_uvarint(raw, pos)
    return Cursor(int.from_bytes(raw[1:3], "big"), partition, offset)

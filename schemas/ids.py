"""Names in the log: UUIDv7 request ids (time-ordered, unguessable random part) and served model names."""

from __future__ import annotations

import os
import re
import time
import uuid

from schemas.errors import ValidationError

# Clock difference tolerated between whoever made a request id and the broker's LogAppendTime: a request's events
# are looked for from its id's time less this margin.
CLOCK_SKEW_MS = 5_000

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_MODEL_NAMES = frozenset({"dlq"})  # requests.dlq is the dead-letter topic


def is_model_name(name: str) -> bool:
    """A served model name: short, and legal inside a Kafka topic name (requests.<name>)."""
    return MODEL_NAME.fullmatch(name) is not None and name not in RESERVED_MODEL_NAMES


def new_request_id(now_ms: int | None = None) -> str:
    """A fresh UUIDv7 (RFC 9562): 48-bit Unix ms, version 7, 74 random bits."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    if not 0 <= ms < 1 << 48:
        raise ValidationError(f"timestamp {ms} does not fit a UUIDv7")
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def parse_request_id(text: str) -> uuid.UUID:
    """The UUID of a request id; ValidationError unless it is a canonical UUIDv7."""
    try:
        value = uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        raise ValidationError(f"request id {text!r} is not a UUID") from None
    if value.version != 7 or str(value) != text:
        raise ValidationError(f"request id {text!r} is not a canonical UUIDv7")
    return value


def request_id_time_ms(text: str) -> int:
    """Unix ms when the request id was made."""
    return parse_request_id(text).int >> 80


def is_request_id(text: str) -> bool:
    try:
        parse_request_id(text)
    except ValidationError:
        return False
    return True

"""UUIDv7 request ids."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas.errors import ValidationError
from schemas.ids import is_request_id, new_request_id, parse_request_id, request_id_time_ms


def test_version_and_variant() -> None:
    value = uuid.UUID(new_request_id())
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_time_reads_back() -> None:
    now = int(time.time() * 1000)
    assert request_id_time_ms(new_request_id(now)) == now


def test_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_request_id(1_700_000_000_000 + i) for i in range(100)]
    assert ids == sorted(ids)
    assert len({new_request_id(5) for _ in range(1000)}) == 1000


@pytest.mark.parametrize("bad", ["", "nope", str(uuid.uuid4()), "01890A5D-AC96-774B-BCCE-B302099A8057", "x" * 36])
def test_rejects_non_uuid7(bad: str) -> None:
    assert not is_request_id(bad)
    with pytest.raises(ValidationError):
        parse_request_id(bad)

"""Time arguments of `tokenrelay tail` and `export`, and the lines they print."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from aiokafka.structs import ConsumerRecord

from schemas.codec import default_codec
from schemas.errors import ConfigError
from schemas.records import Delta, TokenEvent
from services.cli.logtools import export_line, parse_time, tail_line

NOW = 1_700_000_000_000
RID = "01890a5d-ac96-774b-bcce-b302099a8057"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", NOW - 600_000),
        ("2h", NOW - 7_200_000),
        ("30s", NOW - 30_000),
        ("1d", NOW - 86_400_000),
        ("1.5h", NOW - 5_400_000),
        ("250ms", NOW - 250),
        ("now", NOW),
        ("2023-11-14T22:13:20Z", 1_700_000_000_000),
        ("2023-11-14T23:13:20+01:00", 1_700_000_000_000),
        ("1700000000000", 1_700_000_000_000),
    ],
)
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text, now_ms=NOW) == expected


def test_naive_iso_is_local_time() -> None:
    assert parse_time("2023-11-14T22:13:20", now_ms=NOW) == int(datetime(2023, 11, 14, 22, 13, 20).timestamp() * 1000)


@pytest.mark.parametrize("text", ["", "yesterday", "10 minutes", "-5m", "12"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_time(text, now_ms=NOW)


def _record(value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t", 3, 42, NOW, 1, RID.encode(), value, None, len(RID), len(value), [])


def test_export_and_tail_lines() -> None:
    raw = default_codec().encode(TokenEvent(RID, "run1", 2, NOW, Delta(" hi", (5, 6))))
    line = json.loads(json.dumps(export_line(_record(raw))))
    assert line["partition"] == 3 and line["offset"] == 42 and line["key"] == RID
    assert line["event"]["type"] == "Delta" and line["event"]["payload"] == {
        "text": " hi",
        "token_ids": [5, 6],
        "index": 0,
        "logprobs": [],
    }
    assert 'token " hi" [5, 6]' in tail_line(_record(raw))
    bad = export_line(_record(b"\x00garbage"))
    assert "error" in bad and "event" not in bad
    assert "undecodable" in tail_line(_record(b"\x00garbage"))


def test_parquet_rows_flatten_the_payload() -> None:
    from schemas.records import Finished, Usage
    from services.cli.logtools import PARQUET_COLUMNS, parquet_row

    delta = parquet_row(export_line(_record(default_codec().encode(TokenEvent(RID, "r", 1, NOW, Delta("ab", (1, 2)))))))
    assert set(delta) == set(PARQUET_COLUMNS)
    assert (delta["type"], delta["text"], delta["token_count"], delta["offset"]) == ("Delta", "ab", 2, 42)
    done = TokenEvent(RID, "r", 2, NOW, Finished("stop", Usage(3, 2), 5, 9))
    row = parquet_row(export_line(_record(default_codec().encode(done))))
    assert (row["finish_reason"], row["prompt_tokens"], row["completion_tokens"], row["total_ms"]) == ("stop", 3, 2, 9)
    bad = parquet_row(export_line(_record(b"\x00garbage")))
    assert bad["undecodable"] and bad["type"] is None

"""`tokenrelay export` and `tail` on a real broker: a log with every payload type, every record decoded."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from services.cli.logtools import export, tail
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.scripted_events import produce, script

pytestmark = pytest.mark.integration


async def test_export_of_a_time_range(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, events_partitions=3)
    await ensure_topics(settings)
    before, _ = script(3)
    await produce(settings, before)
    await asyncio.sleep(0.05)
    since = int(time.time() * 1000)
    events, expected = script(12, failed=1, accepted=True)
    await produce(settings, events, extra_raw=[b"\xc3\x01 not a real record"])
    until = int(time.time() * 1000) + 1
    await asyncio.sleep(0.05)
    after, _ = script(2)
    await produce(settings, after)

    out = tmp_path / "range.jsonl"
    assert await export(settings, since=str(since), until=str(until), out=str(out)) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    decoded = [line for line in lines if "event" in line]
    errors = [line for line in lines if "error" in line]
    assert len(decoded) == expected.events and len(errors) == 1
    assert sorted((e["event"]["request_id"], e["event"]["run_id"], e["event"]["seq"]) for e in decoded) == sorted(
        (e.request_id, e.run_id, e.seq) for e in events
    )
    assert all(since <= line["timestamp"] < until and line["key"] for line in lines)
    completion = sum(
        e["event"]["payload"]["usage"]["completion_tokens"] for e in decoded if e["event"]["type"] == "Finished"
    )
    assert completion == expected.completion_tokens

    # tail of one request: its events only, in order, and it stops at Finished.
    rid = events[0].request_id
    capsys.readouterr()
    assert await tail(settings, request_id=rid) == 0
    printed = capsys.readouterr().out.splitlines()
    mine = [e for e in events if e.request_id == rid]
    assert len(printed) == len(mine) and all(rid in line for line in printed)
    assert " accepted " in printed[0] and " started " in printed[1] and " done " in printed[-1]
    assert {e["event"]["type"] for e in decoded} == {"Accepted", "Started", "Delta", "Finished", "Failed"}

    # and one that failed: it stops at Failed.
    failed = events[-1].request_id
    capsys.readouterr()
    assert await tail(settings, request_id=failed) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and " accepted " in printed[0] and " failed deadline_exceeded" in printed[-1]

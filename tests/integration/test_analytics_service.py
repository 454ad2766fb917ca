"""The analytics service on a real broker: exact usage from a scripted log, unchanged over restarts and kills."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.local.broker.runner import free_port
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.analytics_support import Analytics, get_json
from tests.integration.scripted_events import barrier, produce, script

pytestmark = pytest.mark.integration


def _metrics(port: int) -> dict[str, float]:
    """Unlabelled samples of the analytics /metrics page, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


@pytest.fixture
def analytics(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[tuple[Settings, Analytics]]:
    port = free_port()
    env = {
        **os.environ,
        "TOKENRELAY_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "TOKENRELAY_TOPIC_PREFIX": topic_prefix,
        "TOKENRELAY_ANALYTICS_PORT": str(port),
        "TOKENRELAY_CACHE_DIR": str(tmp_path / "cache"),
        "TOKENRELAY_EVENTS_PARTITIONS": "4",
        "TOKENRELAY_LOG_LEVEL": "INFO",
        "TOKENRELAY_LOG_FORMAT": "json",
    }
    settings = Settings.from_env(env)
    service = Analytics(env, port, tmp_path / "analytics.log")
    yield settings, service
    if service.proc is not None:
        service.proc.kill()
        service.proc.wait()


def test_usage_counts_exactly_and_survives_restarts(analytics: tuple[Settings, Analytics]) -> None:
    settings, service = analytics
    asyncio.run(ensure_topics(settings))
    partitions = settings.events_partitions
    events, expected = script(40, duplicate_finished=3, failed=2)
    # A barrier request behind them in every partition: once it is counted, so is everything before it.
    fence, fenced, tenants = barrier(partitions, "a")
    asyncio.run(produce(settings, events + fence, extra_raw=[b"not avro at all"]))
    service.start()
    usage = service.wait_tenants(tenants)
    totals = usage["totals"]
    assert totals["completion_tokens"] == expected.completion_tokens + fenced.completion_tokens
    assert totals["prompt_tokens"] == expected.prompt_tokens + fenced.prompt_tokens
    assert totals["requests"] == expected.finished + fenced.finished
    assert totals["failed"] == 2
    by_model = {m: row["completion_tokens"] for m, row in usage["by_model"].items()}
    assert by_model == {**expected.by_model, **fenced.by_model}
    assert sum(row["completion_tokens"] for row in usage["by_tenant"].values()) == totals["completion_tokens"]
    latency = get_json(f"http://127.0.0.1:{service.port}/latency")
    assert latency is not None and latency["recent"]["ttft"]["count"] == expected.finished + fenced.finished
    with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/", timeout=5) as page:
        assert b"<svg" in page.read()
    metrics = _metrics(service.port)
    assert metrics["tokenrelay_analytics_undecodable_events_total"] == 1
    assert metrics["tokenrelay_analytics_events_total"] >= len(events) + len(fence)  # replays may count twice

    # Killed right after counting: offsets are likely not committed yet, so the restart replays events.
    assert service.stop(signal.SIGKILL) != 0
    service.start()
    more, more_expected = script(5)
    fence, fenced_b, tenants = barrier(partitions, "b")
    asyncio.run(produce(settings, more + fence))
    again = service.wait_tenants(tenants)["totals"]
    added = more_expected.completion_tokens + fenced_b.completion_tokens
    assert again["completion_tokens"] == totals["completion_tokens"] + added
    assert again["requests"] == totals["requests"] + more_expected.finished + fenced_b.finished

    # A clean stop and start: state comes back from the changelog topics, nothing counted twice.
    assert service.stop() == 0
    service.start()
    fence, fenced_c, tenants = barrier(partitions, "c")
    asyncio.run(produce(settings, fence))
    final = service.wait_tenants(tenants)["totals"]
    assert final["completion_tokens"] == again["completion_tokens"] + fenced_c.completion_tokens
    assert final["prompt_tokens"] == again["prompt_tokens"] + fenced_c.prompt_tokens
    assert final["requests"] == again["requests"] + fenced_c.finished
    assert final["failed"] == again["failed"] == 2
    # faust's own log handlers write our JSON lines too (the undecodable record's warning is one of them).
    lines = [json.loads(line) for line in service.log.read_text().splitlines() if line.strip()]
    assert any("undecodable" in line["message"] for line in lines)


def _wait_equal(service: Analytics, path: str, expected: dict[str, Any], timeout_s: float = 120.0) -> None:
    """Until ``service`` answers ``path`` with exactly ``expected`` (503 while the instances rebalance)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        assert service.proc is not None and service.proc.poll() is None, service.log.read_text()[-3000:]
        last = get_json(f"http://127.0.0.1:{service.port}{path}")
        if last == expected:
            return
        time.sleep(0.3)
    raise AssertionError(f"{path} on :{service.port} never equalled the single instance's answer: {last}")


@pytest.mark.slow
def test_two_instances_split_the_partitions_and_each_answers_for_all(
    analytics: tuple[Settings, Analytics], tmp_path: Path
) -> None:
    settings, first = analytics
    asyncio.run(ensure_topics(settings))
    partitions = settings.events_partitions
    events, expected = script(40, duplicate_finished=2, failed=1)
    fence, fenced, tenants = barrier(partitions, "a")
    asyncio.run(produce(settings, events + fence))
    first.start()
    usage = first.wait_tenants(tenants)
    assert usage["totals"]["completion_tokens"] == expected.completion_tokens + fenced.completion_tokens
    single = {"/usage": usage, "/latency": get_json(f"http://127.0.0.1:{first.port}/latency")}

    port = free_port()
    env = {**first.env, "TOKENRELAY_ANALYTICS_PORT": str(port), "TOKENRELAY_CACHE_DIR": str(tmp_path / "cache2")}
    second = Analytics(env, port, tmp_path / "analytics2.log")
    second.start()
    try:
        # Both own some partitions, none twice, all of them together.
        deadline = time.monotonic() + 120
        while True:
            reports = [get_json(f"http://127.0.0.1:{s.port}/local/partitions") for s in (first, second)]
            owned = [set(r["owned"]) if r else set() for r in reports]
            if all(owned) and not owned[0] & owned[1] and owned[0] | owned[1] == set(range(partitions)):
                break
            assert time.monotonic() < deadline, f"partitions never split: {reports}"
            time.sleep(0.3)
        for service in (first, second):
            for path, answer in single.items():
                assert answer is not None
                _wait_equal(service, path, answer)

        # New events land on both instances' partitions; either answers the new whole.
        more, more_expected = script(8)
        fence, fenced_b, tenants = barrier(partitions, "b")
        asyncio.run(produce(settings, more + fence))
        usage_after = [s.wait_tenants(tenants) for s in (first, second)]
        for service in (first, second):
            _wait_equal(service, "/usage", usage_after[0])
        totals = usage_after[0]["totals"]
        added = more_expected.completion_tokens + fenced_b.completion_tokens
        assert totals["completion_tokens"] == usage["totals"]["completion_tokens"] + added
        assert totals["requests"] == usage["totals"]["requests"] + more_expected.finished + fenced_b.finished
        split = f"{sorted(owned[0])} / {sorted(owned[1])}"
        print(f"\nanalytics: partitions split {split}; both answer {totals}")
    finally:
        if second.proc is not None:
            second.stop()

"""A worker process seen from outside: its Prometheus endpoint and `tokenrelay submit --follow`, on a real broker.

The worker runs the synthetic engine (fixed-rate tokens, no model): these tests are about the pipeline around the
engine, and the synthetic engine's exact, predictable token counts make the metrics checkable.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.ids import is_request_id, new_request_id
from schemas.records import Delta, Failed, Finished, InferenceRequest, Started
from services.local.broker.runner import free_port
from services.local.process import quiet_env
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.worker_helpers import collect, produce, worker_process

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def synthetic_worker(kafka_bootstrap: str) -> Iterator[tuple[Settings, str]]:
    """One synthetic-engine worker process with its metrics endpoint on a free port; (settings, metrics URL)."""
    settings = Settings.from_env(
        {},
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        requests_partitions=2,
        events_partitions=2,
        max_tokens_limit=64,
    )
    asyncio.run(ensure_topics(settings))
    port = free_port()
    env = {
        "TOKENRELAY_ENGINE": "synthetic",
        "TOKENRELAY_SYNTHETIC_TOKENS_PER_S": "200",
        "TOKENRELAY_WORKER_METRICS_PORT": str(port),
        "TOKENRELAY_MAX_TOKENS_LIMIT": "64",
    }
    url = f"http://127.0.0.1:{port}/metrics"
    with worker_process(settings, **env) as proc:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "worker exited"
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "metrics endpoint never answered"
                time.sleep(0.1)
        yield settings, url


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_endpoint_counts_what_the_worker_did(synthetic_worker: tuple[Settings, str]) -> None:
    settings, url = synthetic_worker
    before = await scrape(url)
    good = [InferenceRequest(new_request_id(), f"one two three {i}", 5 + i) for i in range(4)]
    bad = InferenceRequest(new_request_id(), "too much", 1000)  # over max_tokens_limit: Failed, not a success
    await produce(settings, [*good, bad])
    events = await collect(settings, [r.request_id for r in [*good, bad]])
    assert isinstance(events[bad.request_id][-1].payload, Failed)
    sent = sum(len(e.payload.token_ids) for r in good for e in events[r.request_id] if isinstance(e.payload, Delta))
    prompt_tokens = sum(
        e.payload.prompt_tokens for r in good for e in events[r.request_id] if isinstance(e.payload, Started)
    )
    assert sent == sum(r.max_tokens for r in good)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + 10
    while True:  # the worker counts a success once its Finished is acknowledged, just after it reached the log
        after = await scrape(url)
        if delta("request_success_total", finished_reason="length") >= len(good) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)

    assert delta("generation_tokens_total") == sent
    assert delta("prompt_tokens_total") == prompt_tokens > 0
    assert delta("request_success_total", finished_reason="length") == len(good)
    successes = {k: v for k, v in after.items() if k[0] == "request_success_total"}
    assert sum(successes.values()) - sum(v for k, v in before.items() if k[0] == "request_success_total") == len(good)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"{histogram}_count") == len(good), histogram
        assert delta(f"{histogram}_bucket", le="+Inf") == len(good), histogram
        assert delta(f"{histogram}_sum") >= 0
    assert delta("inter_token_latency_seconds_count") == sent - len(good)  # every token after a request's first
    assert delta("e2e_request_latency_seconds_sum") > delta("time_to_first_token_seconds_sum") > 0
    assert value(after, "num_requests_running") == 0 and value(after, "num_requests_waiting") == 0


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("tokenrelay")
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


async def run_cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *_cli(),
        *args,
        env=quiet_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, stdout.decode(), stderr.decode()


async def test_submit_follow_prints_the_id_and_the_stream(synthetic_worker: tuple[Settings, str]) -> None:
    settings, _ = synthetic_worker
    code, out, err = await run_cli(settings, "submit", "a backend producer's prompt", "--max-tokens", "12", "--follow")
    assert code == 0, err
    request_id, rest = out.split("\n", 1)
    assert is_request_id(request_id)
    text, marker = rest.rsplit("\n[", 1)
    assert marker == "length: 12 tokens]\n"
    log = (await collect(settings, [request_id]))[request_id]
    deltas = [e.payload for e in log if isinstance(e.payload, Delta)]
    finished = log[-1].payload
    assert isinstance(finished, Finished) and finished.usage.completion_tokens == 12
    assert sum(len(d.token_ids) for d in deltas) == 12
    assert text == "".join(d.text for d in deltas) != ""

    code, out, err = await run_cli(settings, "submit", "fire and forget", "--max-tokens", "3")
    assert code == 0, err
    assert is_request_id(out.strip()) and out.count("\n") == 1
    log = (await collect(settings, [out.strip()]))[out.strip()]
    assert isinstance(log[-1].payload, Finished) and log[-1].payload.usage.completion_tokens == 3

"""Two worker processes, one SIGKILLed mid-generation: every request completes; count what a client sees."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.ids import new_request_id
from schemas.records import Delta, Finished, InferenceRequest, Started, TokenEvent
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.worker_helpers import collect, produce
from tests.tinymodel import build_tiny_model
from workers.engine.engine import Engine, EngineRequest
from workers.engine.sampling import SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def client_view(events: list[TokenEvent]) -> tuple[list[int], int, int]:
    """Token ids a client following the log ends up with, seamless continuations, restarts."""
    shown: list[int] = []
    seamless = restarts = 0
    for event in events:
        payload = event.payload
        if isinstance(payload, Started):
            if payload.continues_run_id and payload.continued_tokens == len(shown):
                seamless += 1
            elif shown:
                restarts += 1
                shown = []
        elif isinstance(payload, Delta):
            shown.extend(payload.token_ids)
    return shown, seamless, restarts


async def _first_delta_of(settings: Settings, worker: str) -> None:
    """Return as soon as a run of ``worker`` has sent a Delta: the moment to kill it mid-generation."""
    from aiokafka import TopicPartition

    from schemas.codec import default_codec
    from services.kafka import make_consumer, start_client

    consumer = make_consumer(settings)
    await start_client(consumer)
    runs: set[str] = set()
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)])
        while True:
            for records in (await consumer.getmany(timeout_ms=50)).values():
                for record in records:
                    event = default_codec().decode_event(record.value)
                    if isinstance(event.payload, Started) and event.payload.worker == worker:
                        runs.add(event.run_id)
                    elif isinstance(event.payload, Delta) and event.run_id in runs:
                        return
    finally:
        await consumer.stop()


def _spawn(settings: Settings, model_dir: Path, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TOKENRELAY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TOKENRELAY_TOPIC_PREFIX": settings.topic_prefix,
        "TOKENRELAY_REQUESTS_PARTITIONS": "4",
        "TOKENRELAY_EVENTS_PARTITIONS": "2",
        "TOKENRELAY_MODEL": str(model_dir),
        "TOKENRELAY_DEVICE": "cpu",
        "TOKENRELAY_MAX_BATCH_SIZE": "4",
        "TOKENRELAY_WORKER_METRICS_PORT": "0",
        "TOKENRELAY_WORKER_ID": name,
        "TOKENRELAY_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "workers.main"], cwd=ROOT, env=env)


async def test_sigkill_one_of_two_workers(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    settings = Settings.from_env(
        {}, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, requests_partitions=4, events_partitions=2
    )
    await ensure_topics(settings)
    model_dir = build_tiny_model(tmp_path / "tiny")
    requests = [InferenceRequest(new_request_id(), f"The quick brown fox {i}", 200, temperature=0.0) for i in range(20)]
    workers = [_spawn(settings, model_dir, "w1"), _spawn(settings, model_dir, "w2")]
    try:
        await asyncio.sleep(6)  # both join the group before the work arrives, so both get partitions
        await produce(settings, requests)
        await _first_delta_of(settings, "w1")
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        events = await collect(settings, [r.request_id for r in requests], timeout_s=150)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(30)
    engine = Engine.load(str(model_dir), device="cpu", max_batch_size=20)
    direct = engine.generate(
        [EngineRequest(r.request_id, engine.encode_prompt(r.prompt), SamplingParams(200, 0.0)) for r in requests]
    )
    lost = duplicated = seamless_total = restarts_total = 0
    for r in requests:
        evs = events[r.request_id]
        terminals = [e for e in evs if e.is_terminal]
        assert len(terminals) == 1 and isinstance(terminals[0].payload, Finished)
        shown, seamless, restarts = client_view(evs)
        expected = direct[r.request_id][0]
        lost += max(0, len(expected) - len(shown))
        duplicated += max(0, len(shown) - len(expected))
        seamless_total += seamless
        restarts_total += restarts
        assert shown == expected
        assert terminals[0].payload.usage.completion_tokens == len(expected)
    print(f"\nfailover: lost={lost} duplicated={duplicated} seamless={seamless_total} restarts={restarts_total}")
    assert lost == duplicated == 0

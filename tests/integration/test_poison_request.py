"""A request that kills its worker process every time: bounded retries, then the DLQ and an error the client sees,
while the other requests are served."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from schemas.ids import new_request_id
from schemas.records import InferenceRequest
from schemas.view import replay
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.crash_worker import POISON
from tests.integration.worker_helpers import collect_records, dlq_records, produce, worker_process

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

MAX_STALLED = 3
DEADLINE_S = 420.0


async def test_a_request_that_kills_every_worker_ends_in_the_dlq_with_an_error(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path
) -> None:
    model_dir = tiny_model_dir
    settings = Settings.from_env(
        {},
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        requests_partitions=2,
        events_partitions=2,
        model=str(model_dir),
        served_name="default",
        max_stalled_runs=MAX_STALLED,
        worker_session_timeout_ms=6000,
        worker_metrics_port=0,
    )
    await ensure_topics(settings)
    poison = InferenceRequest(new_request_id(), f"tell me {POISON} now", 8, temperature=0.0)
    others = [InferenceRequest(new_request_id(), f"an innocent prompt {i}", 8, temperature=0.0) for i in range(3)]
    await produce(settings, [poison, *others])

    deaths = 0
    deadline = time.monotonic() + DEADLINE_S
    collecting = asyncio.create_task(collect_records(settings, [poison.request_id], timeout_s=DEADLINE_S))
    while not collecting.done():
        assert time.monotonic() < deadline, f"the poison request never ended ({deaths} worker deaths)"
        with worker_process(settings, module="tests.integration.crash_worker") as proc:
            while proc.poll() is None and not collecting.done():
                await asyncio.wait({collecting}, timeout=0.5)
            if proc.poll() is not None:
                deaths += 1
    records = collecting.result()[poison.request_id]
    seen = replay(poison.request_id, records)
    assert seen[-1].event == "error" and seen[-1].data["code"] == "worker_crashed", [e.event for e in seen]
    assert deaths == MAX_STALLED, deaths  # exactly the bounded number of attempts

    dead = await dlq_records(settings, 1)
    key, _, headers = dead[0]
    assert key == poison.request_id.encode()
    assert headers["error-code"] == b"worker_crashed"

    # The innocent requests were served (a worker that does not die on them finishes them).
    with worker_process(settings, module="tests.integration.crash_worker"):
        done = await collect_records(settings, [r.request_id for r in others], timeout_s=120)
    for request in others:
        assert replay(request.request_id, done[request.request_id])[-1].event == "done", request.request_id

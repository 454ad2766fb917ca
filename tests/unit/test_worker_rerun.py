"""A request taken again after a rebalance while the engine still winds down its abandoned run (no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas.codec import default_codec
from schemas.records import Delta, Finished, InferenceRequest, TokenEvent
from schemas.sampling import SamplingParams
from services.settings import Settings
from tests.tinymodel import build_tiny_model
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest
from workers.intake import OffsetTracker
from workers.main import Worker

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine.load(str(build_tiny_model(tmp_path_factory.mktemp("tiny"))), device="cpu", max_batch_size=4)


def _record(tp: TopicPartition, request: InferenceRequest) -> ConsumerRecord[bytes, bytes]:
    value = default_codec().encode(request)
    key = request.request_id.encode()
    return ConsumerRecord(tp.topic, tp.partition, 7, 0, 0, key, value, None, len(key), len(value), ())


def _published(worker: Worker) -> list[TokenEvent]:
    queue = worker.publisher._queue
    events = []
    while not queue.empty():
        event, done = queue.get_nowait()
        done.set_result(None)  # as if acknowledged
        events.append(event)
    return events


async def test_abandoned_run_never_feeds_or_cancels_the_new_run_of_the_same_request(
    engine: Engine, tmp_path: Path
) -> None:
    worker = Worker(Settings(worker_metrics_port=0, max_batch_size=4), engine)
    try:
        await _rerun(worker, engine)
    finally:  # never started: closing only keeps the unused clients from warning
        await worker.producer.stop()
        await worker.consumer.stop()
        await worker.history.stop()
        await worker.control._consumer.stop()
        worker._executor.shutdown()


async def _rerun(worker: Worker, engine: Engine) -> None:
    tp = TopicPartition(worker.settings.requests_topic, 0)
    request = InferenceRequest("r-1", "The quick brown fox", MAX_TOKENS, temperature=0.0)
    (expected, expected_text, _) = engine.generate(
        [EngineRequest("direct", engine.encode_prompt(request.prompt), SamplingParams(MAX_TOKENS, 0.0))]
    )["direct"]
    worker.trackers[tp] = OffsetTracker()

    await worker._take(tp, _record(tp, request))
    old = worker.active["r-1"]
    engine.add(worker._adds.pop())
    for _ in range(3):  # the old run streams a few tokens
        for out in engine.step():
            worker._on_output(out)
    # Its partition is revoked (the run is abandoned, its abort queued) and assigned back: the record is taken
    # again, with nothing in the log to continue from, before the engine has processed the abort.
    old.stream.abandoned = True
    worker._aborts.append(old.stream.run_id)
    await worker._take(tp, _record(tp, request))
    new = worker.active["r-1"]
    assert new.stream.run_id != old.stream.run_id
    for add in worker._adds:
        engine.add(add)
    for run_id in worker._aborts:
        engine.abort(run_id)
    while engine.has_work():
        for out in engine.step():
            worker._on_output(out)

    events = [e for e in _published(worker) if e.run_id == new.stream.run_id]
    terminal = [e.payload for e in events if e.is_terminal]
    assert len(terminal) == 1 and isinstance(terminal[0], Finished), terminal
    assert terminal[0].usage.completion_tokens == len(expected)
    deltas = [e.payload for e in events if isinstance(e.payload, Delta)]
    assert [t for d in deltas for t in d.token_ids] == expected
    assert "".join(d.text for d in deltas) == expected_text
    assert worker.runs == {}

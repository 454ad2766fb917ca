"""Two worker processes, one SIGKILLed with many requests mid-generation: every request completes once, and a
client following the log loses and repeats no token."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from schemas.records import Delta, Finished, InferenceRequest, Started, TokenEvent
from schemas.sampling import SamplingParams
from services.kafka import make_consumer, start_client
from services.local.process import quiet_env, spawn
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.secure_support import SECURE_TOO, as_role, secured, security
from tests.integration.worker_helpers import client_view, collect_records, describe, produce, wait_group_members
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
REQUEST_PARTITIONS = 4
PER_PARTITION = 6  # 24 requests, 12 per worker
BATCH = 8  # each worker runs 8 at once: the victim has 8 in flight when it dies
MAX_TOKENS = 120
STEP_DELAY_S = "0.025"  # ≥ 3 s per generation, so the kill lands mid-generation on any machine
SESSION_TIMEOUT_MS = "6000"  # the broker's default group.min.session.timeout.ms: the fastest legal detection
MIN_CAUGHT = 5


def balanced_requests() -> list[InferenceRequest]:
    """PER_PARTITION requests on every requests partition, so each worker surely gets a full batch."""
    per: dict[int, list[InferenceRequest]] = {p: [] for p in range(REQUEST_PARTITIONS)}
    i = 0
    while any(len(v) < PER_PARTITION for v in per.values()):
        rid = new_request_id()
        bucket = per[partition_for_key(rid, REQUEST_PARTITIONS)]
        if len(bucket) < PER_PARTITION:
            bucket.append(InferenceRequest(rid, f"The quick brown fox {i}", MAX_TOKENS, temperature=0.0))
            i += 1
    return [r for v in per.values() for r in v]


async def signal_when_mid_generation(
    settings: Settings, victim: subprocess.Popen[bytes], worker: str, sig: signal.Signals = signal.SIGKILL
) -> int:
    """Send ``sig`` to ``victim`` once MIN_CAUGHT of its runs have streamed tokens and have not finished."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    streaming: dict[str, bool] = {}  # run id of the victim → has sent a Delta
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)])
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=20)).values():
                for record in records:
                    event = default_codec().decode_event(record.value)
                    if isinstance(event.payload, Started) and event.payload.worker == worker:
                        streaming[event.run_id] = False
                    elif event.run_id in streaming:
                        if event.is_terminal:
                            del streaming[event.run_id]
                        else:
                            streaming[event.run_id] = True
            in_flight = sum(streaming.values())
            if in_flight >= MIN_CAUGHT:
                victim.send_signal(sig)
                if sig == signal.SIGKILL:
                    victim.wait()
                return in_flight
        raise AssertionError(f"{worker} never had {MIN_CAUGHT} requests streaming: {streaming}")
    finally:
        await consumer.stop()


def start_worker(settings: Settings, model_dir: Path, name: str) -> subprocess.Popen[bytes]:
    env = quiet_env(
        as_role(settings, "worker"),
        TOKENRELAY_MODEL=str(model_dir),
        TOKENRELAY_SERVED_NAME=settings.served_model,
        TOKENRELAY_DEVICE="cpu",
        TOKENRELAY_MAX_BATCH_SIZE=str(BATCH),
        TOKENRELAY_WORKER_METRICS_PORT="0",
        TOKENRELAY_WORKER_ID=name,
        TOKENRELAY_WORKER_SESSION_TIMEOUT_MS=SESSION_TIMEOUT_MS,
        TOKENRELAY_TEST_STEP_DELAY_S=STEP_DELAY_S,
    )
    return spawn([sys.executable, "-m", "tests.integration.slow_worker"], cwd=ROOT, env=env)


@SECURE_TOO
async def test_sigkill_one_of_two_workers_mid_generation(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path
) -> None:
    settings = secured(
        Settings.from_env(
            {},
            kafka_bootstrap=kafka_bootstrap,
            topic_prefix=topic_prefix,
            requests_partitions=REQUEST_PARTITIONS,
            events_partitions=2,
            **security(kafka_bootstrap),
        )
    )
    await ensure_topics(settings)
    model_dir = tiny_model_dir
    requests = balanced_requests()
    ids = [r.request_id for r in requests]
    workers = [start_worker(settings, model_dir, "w1"), start_worker(settings, model_dir, "w2")]
    started = time.monotonic()
    try:
        await wait_group_members(settings, 2)  # both hold partitions before the work arrives
        await produce(settings, requests)
        in_flight = await signal_when_mid_generation(settings, workers[0], "w1")
        killed_at = time.monotonic()
        records = await collect_records(settings, ids, timeout_s=120)
        recovered_s = time.monotonic() - killed_at
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(30)
    lost, duplicated, seamless, restarts = ended_once_with_reference_text(model_dir, requests, records)
    caught = sum(caught_mid_generation(records[r.request_id], "w1") for r in requests)
    print(
        f"\nfailover: {len(requests)} requests, {in_flight} streaming on the victim at the kill, {caught} caught "
        f"mid-generation; lost={lost} duplicated={duplicated} seamless={seamless} restarts={restarts}; "
        f"all done {recovered_s:.1f}s after the kill, {time.monotonic() - started:.1f}s in all"
    )
    assert caught >= MIN_CAUGHT
    assert lost == duplicated == 0


async def test_a_worker_stopped_past_its_session_comes_back_and_no_request_is_lost(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path
) -> None:
    """SIGSTOP of a worker mid-generation past its session timeout (the other takes its partitions over and continues
    its runs), more requests meanwhile, then SIGCONT: the stopped one wakes with runs it no longer owns, rejoins and
    takes half the partitions back from runs the other must abandon. Every request ends once, with its greedy text."""
    settings = Settings.from_env(
        {},
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        requests_partitions=REQUEST_PARTITIONS,
        events_partitions=2,
    )
    await ensure_topics(settings)
    requests = balanced_requests()
    more = balanced_requests()
    workers = [start_worker(settings, tiny_model_dir, "w1"), start_worker(settings, tiny_model_dir, "w2")]
    try:
        await wait_group_members(settings, 2)
        await produce(settings, requests)
        await signal_when_mid_generation(settings, workers[0], "w1", signal.SIGSTOP)
        await produce(settings, more)
        await wait_continued(settings, by="w2", of="w1")  # the session ran out: w2 holds w1's requests now
        workers[0].send_signal(signal.SIGCONT)
        await wait_group_members(settings, 2)
        records = await collect_records(settings, [r.request_id for r in requests + more], timeout_s=180)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGCONT)
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(60)
    lost, duplicated, seamless, restarts = ended_once_with_reference_text(tiny_model_dir, requests + more, records)
    print(f"\nstopped and back: lost={lost} duplicated={duplicated} seamless={seamless} restarts={restarts}")
    assert lost == duplicated == 0


async def wait_continued(settings: Settings, *, by: str, of: str, timeout_s: float = 90) -> None:
    """Until a run of worker ``by`` continues a run of worker ``of``."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    runs_of: set[str] = set()
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    started = default_codec().decode_event(record.value)
                    if not isinstance(started.payload, Started):
                        continue
                    if started.payload.worker == of:
                        runs_of.add(started.run_id)
                    elif started.payload.worker == by and started.payload.continues_run_id in runs_of:
                        return
        raise AssertionError(f"no run of {by} continued one of {of}'s {len(runs_of)} runs")
    finally:
        await consumer.stop()


def caught_mid_generation(log: list[tuple[int, TokenEvent]], worker: str) -> bool:
    """Whether a run of ``worker`` streamed tokens for this request and never ended it."""
    events = [ev for _, ev in log]
    runs = {ev.run_id for ev in events if isinstance(ev.payload, Started) and ev.payload.worker == worker}
    ended = any(ev.is_terminal and ev.run_id in runs for ev in events)
    return any(isinstance(ev.payload, Delta) and ev.run_id in runs for ev in events) and not ended


def ended_once_with_reference_text(
    model_dir: Path, requests: list[InferenceRequest], records: dict[str, list[tuple[int, TokenEvent]]]
) -> tuple[int, int, int, int]:
    """Assert every request ended exactly once, done, with the engine's own greedy text; (lost tokens, duplicated
    tokens, seamless continuations, restarts) as a client following the log saw them."""
    engine = Engine.load(str(model_dir), device="cpu", max_batch_size=len(requests))
    direct = engine.generate(
        [EngineRequest(r.request_id, engine.encode_prompt(r.prompt), SamplingParams(MAX_TOKENS, 0.0)) for r in requests]
    )
    lost = duplicated = seamless = restarts = 0
    for r in requests:
        log = records[r.request_id]
        events = [ev for _, ev in log]
        assert sum(ev.is_terminal for ev in events) == 1, "\n".join(f"{o} {describe(ev)}" for o, ev in log)
        view = client_view(r.request_id, log)
        assert view.terminals == ["done"], r.request_id
        expected_ids, expected_text, _ = direct[r.request_id]
        common = 0
        while common < min(len(expected_ids), len(view.token_ids)) and expected_ids[common] == view.token_ids[common]:
            common += 1
        lost += len(expected_ids) - common
        duplicated += len(view.token_ids) - common
        seamless += view.seamless
        restarts += view.restarts
        finished = events[-1].payload
        assert isinstance(finished, Finished) and finished.usage.completion_tokens == len(expected_ids)
        assert view.text == expected_text
    return lost, duplicated, seamless, restarts

"""Helpers for the worker integration tests: run a worker in-process, produce requests, collect events."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from schemas.codec import default_codec
from schemas.records import ControlEvent, InferenceRequest, ModelInfo, TokenEvent
from services.kafka import make_consumer, make_producer, record_headers, start_client
from services.local.process import quiet_env
from services.settings import Settings
from services.topics import ensure_topics
from workers.engine.types import EngineLike
from workers.main import Worker

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def worker_process(settings: Settings, module: str = "workers.main", **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker subprocess (``python -m module``) on the broker and topics of ``settings``, plus ``env``."""
    proc = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=quiet_env(settings, **env))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, engine: EngineLike) -> AsyncIterator[Worker]:
    await ensure_topics(settings)
    worker = Worker(settings, engine)
    task = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    assert ready.done(), "worker got no partitions within 60 s"
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def produce(settings: Settings, requests: Iterable[InferenceRequest]) -> None:
    producer = make_producer(settings)
    await start_client(producer)
    try:
        for r in requests:
            await producer.send(
                settings.requests_topic,
                default_codec().encode(r),
                key=r.request_id.encode(),
                headers=record_headers("InferenceRequest"),
            )
        await producer.flush()
    finally:
        await producer.stop()


async def produce_raw(settings: Settings, topic: str, key: bytes, value: bytes) -> None:
    producer = make_producer(settings)
    await start_client(producer)
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def cancel(settings: Settings, request_id: str) -> None:
    event = ControlEvent(request_id, "cancel", int(time.time() * 1000))
    await produce_raw(settings, settings.control_topic, request_id.encode(), default_codec().encode(event))


async def collect(
    settings: Settings, ids: Iterable[str], timeout_s: float = 40.0, until_terminal: bool = True
) -> dict[str, list[TokenEvent]]:
    """Every event of ``ids`` from the start of the events topic, until each has a terminal event."""
    wanted = set(ids)
    events: dict[str, list[TokenEvent]] = {i: [] for i in wanted}
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        parts = range(settings.events_partitions)
        consumer.assign([TopicPartition(settings.events_topic, p) for p in parts])
        deadline = time.monotonic() + timeout_s
        while any(not (e and e[-1].is_terminal) for e in events.values()):
            assert time.monotonic() < deadline, {k: len(v) for k, v in events.items()}
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    event = default_codec().decode_event(record.value)
                    if event.request_id in wanted:
                        events[event.request_id].append(event)
    finally:
        await consumer.stop()
    return events


async def collect_records(
    settings: Settings, ids: Iterable[str], timeout_s: float = 40.0
) -> dict[str, list[tuple[int, TokenEvent]]]:
    """(offset, event) of every event of ``ids`` in log order, until each request's log holds a terminal event."""
    wanted = set(ids)
    records: dict[str, list[tuple[int, TokenEvent]]] = {i: [] for i in wanted}
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)])
        deadline = time.monotonic() + timeout_s
        while any(not any(ev.is_terminal for _, ev in r) for r in records.values()):
            assert time.monotonic() < deadline, {k: len(v) for k, v in records.items()}
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                for record in batch:
                    event = default_codec().decode_event(record.value)
                    if event.request_id in wanted:
                        records[event.request_id].append((record.offset, event))
    finally:
        await consumer.stop()
    return records


async def dlq_records(
    settings: Settings, count: int, timeout_s: float = 30.0
) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        consumer.assign([TopicPartition(settings.dlq_topic, 0)])
        out: list[tuple[bytes, bytes, dict[str, bytes]]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            assert time.monotonic() < deadline
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [(r.key, r.value, dict(r.headers)) for r in records]
        return out
    finally:
        await consumer.stop()


async def announce(settings: Settings, name: str = "default", ttl_ms: int = 600_000, **fields: Any) -> None:
    """Announce a model on the models topic as a worker would, for gateway tests that need no worker to run."""
    values: dict[str, Any] = {"context_length": 1 << 20, "has_chat_template": True, "worker": "test-announcer"}
    values.update(fields)
    info = ModelInfo(name=name, ts_ms=int(time.time() * 1000), ttl_ms=ttl_ms, **values)
    await produce_raw(settings, settings.models_topic, name.encode(), default_codec().encode(info))


async def wait_announced(
    settings: Settings, name: str, timeout_s: float = 120.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until a live announcement of model ``name`` is on the models topic (a worker subprocess has started)."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        tp = TopicPartition(settings.models_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc is None or proc.poll() is None, f"the worker exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"model {name!r} was not announced within {timeout_s} s"
            for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                info = default_codec().decode_model_info(record.value)
                if info.name == name and info.live(int(time.time() * 1000)):
                    return
    finally:
        await consumer.stop()

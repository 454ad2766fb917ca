"""Helpers for the worker integration tests: run a worker in-process, produce requests, collect events."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import GroupCoordinatorNotAvailableError

from schemas.codec import default_codec
from schemas.records import ControlEvent, Delta, InferenceRequest, ModelInfo, Started, TokenEvent
from schemas.view import View
from services.kafka import make_admin, make_consumer, make_producer, record_headers, start_client
from services.local.process import quiet_env, spawn
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.secure_support import as_role
from tests.waiting import wait_until
from workers.engine.types import EngineLike
from workers.main import KafkaClients, Worker

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def worker_process(settings: Settings, module: str = "workers.main", **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker subprocess (``python -m module``) on the broker and topics of ``settings``, plus ``env``; it dies
    with the test process, should that die without stopping it."""
    proc = spawn([sys.executable, "-m", module], cwd=ROOT, env=quiet_env(as_role(settings, "worker"), **env))
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
async def running_worker(
    settings: Settings, engine: EngineLike, clients: KafkaClients | None = None
) -> AsyncIterator[Worker]:
    await ensure_topics(settings)
    worker = Worker(settings, engine, clients)
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


async def produce(settings: Settings, requests: Iterable[InferenceRequest], topic: str | None = None) -> None:
    """Write ``requests`` to ``topic``, by default their class's topic of the served model, as a plain Kafka
    producer would."""
    producer = make_producer(settings)
    await start_client(producer)
    try:
        for r in requests:
            await producer.send(
                topic or settings.requests_topic_for(settings.served_model, r.priority),
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


async def wait_group_members(settings: Settings, count: int, timeout_s: float = 90.0) -> None:
    """Until the worker group is Stable with ``count`` members that all hold partitions."""
    admin = make_admin(settings)
    await admin.start()
    seen = "no group coordinator yet"

    async def stable() -> bool:
        nonlocal seen
        try:
            (response,) = await admin.describe_consumer_groups([settings.worker_group])
        except GroupCoordinatorNotAvailableError:  # a fresh broker creates its offsets topic on first use
            return False
        group = response.groups[0]
        state, members = group[2], group[5]
        seen = f"group {state} with {len(members)} members"
        return state == "Stable" and len(members) == count and all(len(m[-1]) > 8 for m in members)

    try:
        await wait_until(
            stable, lambda: f"{count} workers holding partitions ({seen})", timeout_s=timeout_s, interval_s=0.2
        )
    finally:
        await admin.close()


@dataclass
class ClientView:
    """What a client following the request's log (through the gateway's view) ends up showing."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    seamless: int = 0
    restarts: int = 0
    terminals: list[str] = field(default_factory=list)


def client_view(request_id: str, records: list[tuple[int, TokenEvent]]) -> ClientView:
    """Replay the log through the gateway's View: seamless continuations keep the tokens, a restart replaces them."""
    view = View(request_id)
    run_tokens: dict[str, list[int]] = {}  # tokens each run stands for (inherited + its own), from the log
    out = ClientView()
    for offset, ev in records:
        payload = ev.payload
        if isinstance(payload, Started):
            inherited = run_tokens.get(payload.continues_run_id or "", [])
            run_tokens[ev.run_id] = inherited[: payload.continued_tokens]
        elif isinstance(payload, Delta):
            run_tokens.setdefault(ev.run_id, []).extend(payload.token_ids)
        previous_run = view.run_id
        shown = view.feed(offset, ev)
        if shown is None:
            if isinstance(payload, Started) and previous_run not in (None, ev.run_id) and view.run_id == ev.run_id:
                out.seamless += 1
            continue
        if shown.event in ("started", "restart"):
            out.restarts += shown.event == "restart"
            out.token_ids = list(run_tokens[ev.run_id])
            out.text = shown.data.get("text", "")
        elif shown.event == "token":
            out.token_ids += shown.data["token_ids"]
            out.text += shown.data["text"]
        elif shown.terminal:
            out.terminals.append(shown.event)
    return out


def describe(ev: TokenEvent) -> str:
    """One line per event, for a failure message (its time as the worker stamped it, in ms of the minute)."""
    return f"{ev.ts_ms % 60_000:>5} {_what(ev)}"


def _what(ev: TokenEvent) -> str:
    p = ev.payload
    if isinstance(p, Started):
        base = (p.continues_run_id or "-")[:6]
        return f"{ev.run_id[:6]} {ev.seq} Started by {p.worker}, continues {base} at {p.continued_tokens}"
    if isinstance(p, Delta):
        return f"{ev.run_id[:6]} {ev.seq} Delta {len(p.token_ids)}"
    return f"{ev.run_id[:6]} {ev.seq} {p}"

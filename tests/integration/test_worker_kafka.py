"""The worker against a real broker: streaming, usage, greedy text, cancellation, limits, DLQ, plain-Avro producers."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from pathlib import Path

import fastavro
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import AVRO_DIR, MAGIC, default_codec, fingerprint
from schemas.ids import new_request_id
from schemas.records import ChatMessage, Delta, Failed, Finished, InferenceRequest, Started, TokenEvent
from schemas.sampling import SamplingParams
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.worker_helpers import cancel, collect, dlq_records, produce, produce_raw, running_worker
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest, StepOutput
from workers.main import KafkaClients
from workers.served_model import ServedModel

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str) -> Settings:
    return Settings.from_env(
        {},
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        requests_partitions=2,
        events_partitions=2,
        worker_metrics_port=0,
        max_batch_size=8,
        max_tokens_limit=64,
    )


def check_run(events: list[TokenEvent]) -> tuple[list[int], str, Finished | Failed]:
    """One clean run: seq gap-free from 0, Started first, exactly one terminal event last; returns tokens and text."""
    assert [e.seq for e in events] == list(range(len(events)))
    assert len({e.run_id for e in events}) == 1
    assert isinstance(events[0].payload, Started)
    assert sum(e.is_terminal for e in events) == 1 and events[-1].is_terminal
    deltas = [e.payload for e in events if isinstance(e.payload, Delta)]
    terminal = events[-1].payload
    assert isinstance(terminal, Finished | Failed)
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), terminal


async def test_many_concurrent_requests_stream_with_exact_usage(settings: Settings, engine: Engine) -> None:
    prompts = [f"Hello {i} the quick brown fox" for i in range(16)]
    requests = [InferenceRequest(new_request_id(), p, 6 + i % 5, temperature=0.0) for i, p in enumerate(prompts)]
    async with running_worker(settings, engine):
        await produce(settings, requests)
        events = await collect(settings, [r.request_id for r in requests])
    direct = engine.generate(
        [
            EngineRequest(r.request_id, engine.encode_prompt(r.prompt), SamplingParams(r.max_tokens, temperature=0))
            for r in requests
        ]
    )
    for r in requests:
        ids, text, terminal = check_run(events[r.request_id])
        assert isinstance(terminal, Finished)
        assert terminal.usage.completion_tokens == len(ids)
        assert (ids, text) == tuple(direct[r.request_id][:2])


async def test_cancel_stops_generation(settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # The random tiny model may end a greedy generation early (its tokenizer is trained afresh in every session),
    # and 64 tokens take milliseconds: no end-of-sequence, and a few ms per step, keep the request running.
    monkeypatch.setattr(engine, "eos_ids", frozenset())
    step = engine.step

    def slow_step() -> list[StepOutput]:
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    request = InferenceRequest(new_request_id(), "Hello", 64, temperature=0.0)
    async with running_worker(settings, engine):
        await produce(settings, [request])
        await collect_first_delta(settings, request.request_id)
        await cancel(settings, request.request_id)
        events = await collect(settings, [request.request_id])
    ids, _, terminal = check_run(events[request.request_id])
    assert isinstance(terminal, Finished) and terminal.finish_reason == "cancelled"
    assert terminal.usage.completion_tokens == len(ids) < 64


async def collect_first_delta(settings: Settings, request_id: str) -> None:
    from aiokafka import TopicPartition

    from schemas.codec import default_codec
    from services.kafka import make_consumer, start_client

    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        parts = range(settings.events_partitions)
        consumer.assign([TopicPartition(settings.events_topic, p) for p in parts])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    event = default_codec().decode_event(record.value)
                    if event.request_id == request_id and isinstance(event.payload, Delta):
                        return
        raise AssertionError("no Delta")
    finally:
        await consumer.stop()


async def test_limits_dlq_and_plain_avro_producer(settings: Settings, engine: Engine) -> None:
    late = InferenceRequest(new_request_id(), "Hello", 4, deadline_ms=int(time.time() * 1000) - 1000)
    zero = InferenceRequest(new_request_id(), "Hello", 0)
    huge = InferenceRequest(new_request_id(), "Hello", 10_000)
    long_prompt = InferenceRequest(new_request_id(), "word " * 2000, 4)
    plain_id = new_request_id()
    async with running_worker(settings, engine):
        await produce_raw(settings, settings.requests_topic, b"garbage-key", b"\x00not avro at all")
        await produce(settings, [late, zero, huge, long_prompt])
        await produce_raw(settings, settings.requests_topic, plain_id.encode(), plain_avro_request(plain_id))
        events = await collect(
            settings, [late.request_id, zero.request_id, huge.request_id, long_prompt.request_id, plain_id]
        )
        dlq = await dlq_records(settings, 1)
    codes = {}
    for rid in (late.request_id, zero.request_id, huge.request_id, long_prompt.request_id):
        terminal = events[rid][-1].payload
        assert isinstance(terminal, Failed) and events[rid][-1].seq == len(events[rid]) - 1
        codes[rid] = terminal.code
    assert codes == {
        late.request_id: "deadline_exceeded",
        zero.request_id: "max_tokens_invalid",
        huge.request_id: "max_tokens_invalid",
        long_prompt.request_id: "prompt_too_long",
    }
    ids, _, terminal = check_run(events[plain_id])
    assert isinstance(terminal, Finished) and terminal.usage.completion_tokens == len(ids) > 0
    key, value, headers = dlq[0]
    assert (key, value) == (b"garbage-key", b"\x00not avro at all")
    assert headers["error-code"] == b"undecodable" and headers["error"]
    assert headers["original-topic"] == settings.requests_topic.encode() and "original-offset" in headers


def plain_avro_request(request_id: str) -> bytes:
    """What a producer that knows only the .avsc and the framing writes: three fields, defaults for the rest."""
    raw = json.loads(Path(AVRO_DIR, "InferenceRequest.v1.avsc").read_text())
    schema = fastavro.parse_schema(raw)
    buf = io.BytesIO()
    record = {"request_id": request_id, "prompt": "The quick brown fox", "max_tokens": 5}
    for f in raw["fields"]:
        record.setdefault(f["name"], f.get("default"))
    fastavro.schemaless_writer(buf, schema, record)
    return MAGIC + fingerprint(raw) + buf.getvalue()


async def test_misuse_ends_each_request_and_cancels_sent_before_the_worker_started_are_honoured(
    settings: Settings, engine: Engine
) -> None:
    assert not engine.has_chat_template  # the tiny test model has none
    chat = InferenceRequest(new_request_id(), "", 4, messages=(ChatMessage("user", "hi"),))
    words = 1
    while len(engine.encode_prompt("word " * words)) < engine.max_positions - 20:
        words += 1
    overflow = InferenceRequest(new_request_id(), "word " * words, 60)  # fits alone, not with 60 more tokens
    cancelled = [InferenceRequest(new_request_id(), f"never run {i}", 60, temperature=0.0) for i in range(5)]
    fine = InferenceRequest(new_request_id(), "The quick brown fox", 5, temperature=0.0)
    await ensure_topics(settings)
    # Sent while no worker is alive: the requests, then their cancels.
    await produce(settings, cancelled)
    for request in cancelled:
        await cancel(settings, request.request_id)
    async with running_worker(settings, engine):
        await produce_raw(settings, settings.requests_topic, b"x", default_codec().encode(_with_id(fine, "x")))
        await produce(settings, [chat, overflow, fine])
        ids = [chat.request_id, overflow.request_id, fine.request_id, *(r.request_id for r in cancelled)]
        events = await collect(settings, ids)
        dlq = await dlq_records(settings, 1)
    chat_end, overflow_end = events[chat.request_id][-1].payload, events[overflow.request_id][-1].payload
    assert isinstance(chat_end, Failed) and chat_end.code == "chat_template_missing"
    assert isinstance(overflow_end, Failed) and overflow_end.code == "context_length_exceeded"
    assert str(engine.max_positions) in overflow_end.message
    for request in cancelled:
        ids_, _, terminal = check_run(events[request.request_id])
        assert isinstance(terminal, Finished) and terminal.finish_reason == "cancelled" and ids_ == []
    _, _, fine_end = check_run(events[fine.request_id])
    assert isinstance(fine_end, Finished) and fine_end.finish_reason == "length"  # the worker kept serving
    key, _, headers = dlq[0]
    assert key == b"x" and headers["error-code"] == b"invalid"  # a request id that is not a UUIDv7


def _with_id(request: InferenceRequest, request_id: str) -> InferenceRequest:
    return dataclasses.replace(request, request_id=request_id)


class SlowEndOffsets(AIOKafkaConsumer):
    """A requests consumer whose end-offsets lookup takes seconds: the worker's assignment callback, which looks the
    ends up, is still running while the fetcher already has the new partitions' records."""

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        await asyncio.sleep(3)
        return await super().end_offsets(partitions)


@dataclasses.dataclass(frozen=True)
class SlowAssignmentClients(KafkaClients):
    def requests_consumer(self, model: str) -> AIOKafkaConsumer:
        consumer = super().requests_consumer(model)
        consumer.__class__ = SlowEndOffsets
        return consumer


@pytest.mark.parametrize("slow", ["end offsets", "whole callback"])
async def test_records_fetched_while_the_assignment_callback_runs_are_taken(
    settings: Settings, engine: Engine, slow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetcher starts on a new assignment before the callback that makes its offset trackers has finished (or
    begun): a record it returns meanwhile must be taken, not dropped with the consumer's position already past it
    (the request would never end, and the next commit would skip it)."""
    requests = [InferenceRequest(new_request_id(), f"Waiting {i}", 4, temperature=0.0) for i in range(6)]
    await ensure_topics(settings)
    await produce(settings, requests)
    clients = SlowAssignmentClients(settings) if slow == "end offsets" else None
    if slow == "whole callback":
        assign = ServedModel.assign

        async def late_assign(self: ServedModel, assigned: set[TopicPartition]) -> None:
            await asyncio.sleep(3)
            await assign(self, assigned)

        monkeypatch.setattr(ServedModel, "assign", late_assign)
    async with running_worker(settings, engine, clients):
        events = await collect(settings, [r.request_id for r in requests], timeout_s=60)
    for r in requests:
        assert isinstance(check_run(events[r.request_id])[2], Finished)

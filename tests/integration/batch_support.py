"""Helpers of the Batch API tests: JSONL input files, polling a batch with the openai SDK, reading output files."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import openai
from openai.types import Batch

from gateway.batch.objects import BatchState
from services.settings import Settings

TERMINAL = ("completed", "failed", "cancelled", "expired")


def chat_line(i: int, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"line-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "default",
            "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **body,
        },
    }


def completion_line(i: int, max_tokens: int = 8) -> dict[str, Any]:
    body = {"model": "default", "prompt": f"The number {i} is", "max_tokens": max_tokens, "temperature": 0}
    return {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}


def response_line(i: int, max_tokens: int = 8) -> dict[str, Any]:
    body = {"model": "default", "input": f"Say something about {i}.", "max_output_tokens": max_tokens, "temperature": 0}
    return {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/responses", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


async def wait_batch(
    client: openai.AsyncOpenAI,
    batch_id: str,
    *,
    until: tuple[str, ...] = TERMINAL,
    completed_at_least: int | None = None,
    timeout_s: float = 300.0,
) -> Batch:
    """Poll the batch until its status is in ``until`` (or it has that many completed lines)."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        counts = batch.request_counts
        if completed_at_least is not None and counts is not None and counts.completed >= completed_at_least:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} is still {batch.status} ({counts}) after {timeout_s} s")
        await asyncio.sleep(0.2)


async def read_file_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines() if line.strip()]


def custom_id_counts(*files: list[dict[str, Any]]) -> Counter[str]:
    return Counter(line["custom_id"] for lines in files for line in lines)


def without_volatile(body: dict[str, Any]) -> dict[str, Any]:
    """A body without what differs between two requests of the same input (ids, creation time)."""
    out = {k: v for k, v in body.items() if k not in ("id", "created", "created_at")}
    if "output" in out:
        out["output"] = [{k: v for k, v in item.items() if k != "id"} for item in out["output"]]
    return out


async def keys_on_topic(settings: Settings, topic: str, keys: set[bytes]) -> Counter[bytes]:
    """How many records of each of ``keys`` the topic holds (all partitions, from the start)."""
    from aiokafka import TopicPartition

    from services.kafka import make_consumer, start_client
    from services.topics import describe_topics

    found: Counter[bytes] = Counter()
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        count = (await describe_topics(settings, [topic]))[topic]
        tps = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        pending = [tp for tp in tps if ends[tp] > 0]
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for records in batches.values():
                found.update(r.key for r in records if r.key in keys)
            pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]
    finally:
        await consumer.stop()
    return found


async def stored_batch(settings: Settings, batch_id: str) -> BatchState:
    """The batch's last record on the compacted batches topic (with its driver's submit cursor)."""
    from aiokafka import TopicPartition

    from services.kafka import make_consumer, start_client

    tp = TopicPartition(settings.batches_topic, 0)
    consumer = make_consumer(settings)
    await start_client(consumer)
    last: BatchState | None = None
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        while await consumer.position(tp) < end:
            for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if record.key == f"batch:{batch_id}".encode() and record.value is not None:
                    last = BatchState.from_json(record.value)
    finally:
        await consumer.stop()
    assert last is not None
    return last

"""Kafka plumbing: producer and consumer factories, headers, error translation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from schemas.codec import CONTENT_TYPE
from schemas.errors import KafkaUnavailable
from services.settings import Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


def record_headers(name: str, traceparent: str | None = None) -> Headers:
    """Kafka headers of a framed Avro record: content type and, when known, W3C trace context."""
    headers = [("content-type", f"{CONTENT_TYPE}; schema=io.tokenrelay.{name}".encode())]
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    return headers


def header_value(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return value.decode("utf-8", "replace")
    return None


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """Idempotent, acks=all producer: an acknowledged record survives a broker restart."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 1,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": settings.producer_timeout_ms,
        "client_id": "tokenrelay",
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """Consumer with manual commits; pass group_id for a group, none for assigned partitions."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "client_id": "tokenrelay",
        "fetch_max_wait_ms": 50,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def start_client(client: AIOKafkaProducer | AIOKafkaConsumer, *, timeout_s: float | None = 60.0) -> None:
    """Start an aiokafka client, retrying while the cluster is not reachable; ``timeout_s`` None retries forever."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    attempt = 0
    while True:
        try:
            await client.start()
            return
        except (KafkaConnectionError, KafkaTimeoutError) as exc:
            if deadline is not None and loop.time() > deadline:
                raise KafkaUnavailable(f"Kafka is not reachable: {exc}") from exc
            attempt += 1
            if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8, ...: an outage of any length logs a few lines, not a flood
                log.warning("Kafka not reachable yet (%s); retrying (attempt %d)", exc, attempt)
            await asyncio.sleep(1.0)


@asynccontextmanager
async def producer(settings: Settings, **overrides: Any) -> AsyncIterator[AIOKafkaProducer]:
    client = make_producer(settings, **overrides)
    await start_client(client)
    try:
        yield client
    finally:
        await client.stop()


def translate(exc: KafkaError) -> KafkaUnavailable:
    """aiokafka error → the project's error, keeping its retriable flag."""
    return KafkaUnavailable(str(exc) or type(exc).__name__, retriable=bool(getattr(exc, "retriable", True)))


def partition_for_key(key: str, partitions: int) -> int:
    """Partition the default (Java-compatible murmur2) partitioner picks for a request id."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions

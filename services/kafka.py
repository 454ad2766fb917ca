"""Kafka plumbing: producer and consumer factories, headers, the one boundary for aiokafka errors, key replay."""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    SaslAuthenticationFailed,
)
from aiokafka.structs import ConsumerRecord

from schemas.codec import CONTENT_TYPE
from schemas.errors import ConfigError, KafkaUnavailable, RecordTooLarge
from services.kafka_auth import aiokafka_options
from services.settings import Settings
from services.tracing import NO_TRACE, TraceHeaders

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


def record_headers(name: str, trace: TraceHeaders = NO_TRACE) -> Headers:
    """Kafka headers of a framed Avro record: content type and, when known, the W3C trace context (traceparent and
    tracestate, see services.tracing)."""
    return [("content-type", f"{CONTENT_TYPE}; schema=io.tokenrelay.{name}".encode()), *trace]


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
        **aiokafka_options(settings),
    }
    options.update(overrides)
    return _remember(AIOKafkaProducer(**options), settings)


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """Consumer with manual commits; pass group_id for a group, none for assigned partitions."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "client_id": "tokenrelay",
        "fetch_max_wait_ms": 50,
        **aiokafka_options(settings),
    }
    options.update(overrides)
    return _remember(AIOKafkaConsumer(*topics, **options), settings)


@contextmanager
def map_kafka_errors(doing: str) -> Iterator[None]:
    """The boundary where aiokafka's errors, and a cluster that does not answer in time, become KafkaUnavailable.

    ``doing`` names the operation for the message ("cannot produce the request"); aiokafka's ``retriable`` is kept.
    A record over the size limit (the producer's or the broker's) is RecordTooLarge: the same record never fits.
    """
    try:
        yield
    except MessageSizeTooLargeError as exc:
        raise RecordTooLarge(f"{doing}: the record is over the cluster's size limit ({exc})", retriable=False) from exc
    except KafkaError as exc:
        retriable = bool(exc.retriable) or isinstance(exc, KafkaTimeoutError)
        raise KafkaUnavailable(f"{doing}: {str(exc) or type(exc).__name__}", retriable=retriable) from exc
    except TimeoutError as exc:
        raise KafkaUnavailable(f"{doing}: timed out") from exc


class Startable(Protocol):
    """An aiokafka producer, consumer or admin client."""

    async def start(self) -> None: ...


async def start_client(client: Startable, *, timeout_s: float | None = 60.0) -> None:
    """Start an aiokafka client, retrying while the cluster is not reachable; ``timeout_s`` None retries forever."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    attempt = 0
    while True:
        try:
            with map_kafka_errors("Kafka is not reachable"):
                await client.start()
            return
        except KafkaUnavailable as exc:
            unreachable = isinstance(exc.__cause__, KafkaConnectionError | KafkaTimeoutError)
            if not unreachable or (deadline is not None and loop.time() > deadline):
                raise
            settings = _settings_of.get(client)
            if attempt == 0 and settings is not None and aiokafka_options(settings)["security_protocol"] != "PLAINTEXT":
                # aiokafka reports refused credentials or certificates as an unreachable cluster (the reason only in
                # its log): ask once, so that a wrong password fails at once as the configuration error it is,
                # instead of being retried as an outage.
                refusal = await refused_because(settings)
                if refusal is not None:
                    raise ConfigError(
                        f"Kafka at {settings.kafka_bootstrap} refuses this client: {refusal} (check "
                        "TOKENRELAY_KAFKA_SASL_USERNAME / _PASSWORD, TOKENRELAY_KAFKA_SSL_CA_FILE and the mechanism)"
                    ) from exc
            attempt += 1
            if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8, ...: an outage of any length logs a few lines, not a flood
                log.warning("Kafka not reachable yet (%s); retrying (attempt %d)", exc.__cause__, attempt)
            await asyncio.sleep(1.0)


_settings_of: weakref.WeakKeyDictionary[object, Settings] = weakref.WeakKeyDictionary()

_Client = TypeVar("_Client")


def _remember(client: _Client, settings: Settings) -> _Client:
    _settings_of[client] = settings
    return client


async def refused_because(settings: Settings, timeout_s: float = 10.0) -> str | None:
    """Why the first bootstrap server that answers refuses the credentials or certificate of ``settings`` (failed
    SASL authentication, an untrusted certificate); None when it accepts them or none answers."""
    from aiokafka.conn import create_conn

    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            continue
        try:
            conn = await asyncio.wait_for(
                create_conn(host.strip("[]"), int(port), **aiokafka_options(settings)), timeout_s
            )
        except (SaslAuthenticationFailed, ssl.SSLCertVerificationError) as exc:
            return str(exc)
        except (OSError, KafkaError, TimeoutError):
            continue
        conn.close()
        return None
    return None


def make_admin(settings: Settings, client_id: str = "tokenrelay-admin") -> AIOKafkaAdminClient:
    client = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, client_id=client_id, **aiokafka_options(settings)
    )
    return _remember(client, settings)


@asynccontextmanager
async def admin(settings: Settings, *, timeout_s: float = 30.0) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client; its aiokafka errors come out as KafkaUnavailable."""
    client = make_admin(settings)
    await start_client(client, timeout_s=timeout_s)
    try:
        with map_kafka_errors("Kafka admin failed"):
            yield client
    finally:
        await client.close()


@asynccontextmanager
async def producer(settings: Settings, **overrides: Any) -> AsyncIterator[AIOKafkaProducer]:
    client = make_producer(settings, **overrides)
    await start_client(client)
    try:
        yield client
    finally:
        await client.stop()


async def read_key(
    consumer: AIOKafkaConsumer, tp: TopicPartition, key: bytes, from_ms: int, stop_offset: int | None = None
) -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
    """Records of one key in one partition, from the first with a timestamp at or after ``from_ms``.

    Ends before ``stop_offset``; with None it follows the partition's new records until the caller stops. The
    consumer must have ``tp`` assigned. Records without a value (tombstones) are skipped.
    """
    found = (await consumer.offsets_for_times({tp: max(0, from_ms)})).get(tp)
    if found is None:
        if stop_offset is not None:
            return
        await consumer.seek_to_end(tp)
        position = await consumer.position(tp)
    else:
        position = found.offset
        consumer.seek(tp, position)
    while stop_offset is None or position < stop_offset:
        batches = await consumer.getmany(tp, timeout_ms=200, max_records=10_000)
        records = batches.get(tp, [])
        for record in records:
            position = record.offset + 1
            if stop_offset is not None and record.offset >= stop_offset:
                return
            if record.key == key and record.value is not None:
                yield record
        if not records and stop_offset is not None:
            # Transaction markers or compaction gaps: trust the consumer's position.
            position = max(position, await consumer.position(tp))


async def read_to_end(
    consumer: AIOKafkaConsumer, topic: str, partitions: int, *, poll_ms: int = 500
) -> AsyncGenerator[tuple[TopicPartition, ConsumerRecord[bytes, bytes]], None]:
    """Every record of ``topic``'s partitions, from the beginning up to each one's end as of now, in each
    partition's order (the consumer gets those partitions assigned)."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    ends = await consumer.end_offsets(tps)
    await consumer.seek_to_beginning(*tps)
    remaining = {tp for tp in tps if ends[tp] > 0}
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=poll_ms, max_records=20_000)
        for tp, records in batches.items():
            for record in records:
                if record.offset < ends[tp]:
                    yield tp, record
        for tp in list(remaining):
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)

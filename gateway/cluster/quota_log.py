"""The quotas topic: every gateway reads all of it into its QuotaBook and writes its reservations and settlements."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.cluster.quotas import (
    BUCKET_MS,
    WINDOW_MS,
    Dimension,
    Limits,
    QuotaBook,
    Refusal,
    Reserve,
    Settle,
    decode_record,
    encode_record,
    parse_limits,
    ratelimit_headers,
)
from gateway.metrics import GatewayMetrics
from schemas.errors import KafkaUnavailable, RateLimited
from services.kafka import make_consumer, map_kafka_errors, start_client
from services.requests import Producer
from services.settings import Settings
from services.topics import describe_topics

log = logging.getLogger(__name__)

HEADERS = [("content-type", b"application/json")]
EXPIRE_EVERY_MS = 1_000
CATCH_UP_S = 30.0


def limits_by_tenant(settings: Settings, tenant_of_key: Callable[[str], str]) -> Callable[[str], Limits]:
    """Each tenant's limits: its TOKENRELAY_QUOTA_OVERRIDES entry (named by key or key id), else the defaults."""
    default = Limits(settings.quota_rpm, settings.quota_tpm, settings.quota_concurrent)
    keys = set(settings.api_keys)
    overrides = {
        tenant_of_key(name) if name in keys else name: parse_limits(text)
        for name, text in settings.quota_override_map.items()
    }
    return lambda tenant: overrides.get(tenant, default)


def limits_configured(settings: Settings) -> bool:
    """Whether any key has a limit (else the gateways leave the quotas topic alone)."""
    default = Limits(settings.quota_rpm, settings.quota_tpm, settings.quota_concurrent)
    return default.any or any(parse_limits(text).any for text in settings.quota_override_map.values())


class QuotaLog:
    """Folds the whole quotas topic into ``book`` (from a lease back at start) and writes this gateway's records."""

    def __init__(
        self,
        settings: Settings,
        producer: Producer,
        book: QuotaBook,
        metrics: GatewayMetrics | None = None,
    ):
        self.settings = settings
        self.topic = settings.quotas_topic
        self.producer = producer
        self.book = book
        self.metrics = metrics
        self._verdicts: dict[str, asyncio.Future[bool]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    def enabled_for(self, tenant: str) -> bool:
        return self.book.limits_of(tenant).any

    async def start(self) -> None:
        """Read the topic from a lease ago up to its end as of now, then follow it."""
        consumer = make_consumer(self.settings, fetch_max_wait_ms=100)
        await start_client(consumer)
        self._consumer = consumer
        with map_kafka_errors("cannot read the quotas topic"):
            count = (await describe_topics(self.settings, [self.topic])).get(self.topic, 0)
            if not count:
                raise KafkaUnavailable(f"topic {self.topic} not found")
            tps = [TopicPartition(self.topic, p) for p in range(count)]
            consumer.assign(tps)
            since = int(time.time() * 1000) - max(WINDOW_MS, self.settings.quota_lease_ms)
            found = await consumer.offsets_for_times({tp: since for tp in tps})
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                at = found.get(tp)
                consumer.seek(tp, at.offset if at is not None else ends[tp])
            async with asyncio.timeout(CATCH_UP_S):
                while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                    await self._poll(consumer)
        self._task = asyncio.create_task(self._run(consumer), name="quotas")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
        for records in batches.values():
            for record in records:
                decoded = decode_record(record.value) if record.value is not None else None
                if decoded is None:
                    continue
                granted = self.book.apply(decoded)
                verdict = self._verdicts.get(decoded.request_id) if isinstance(decoded, Reserve) else None
                if verdict is not None and not verdict.done():
                    verdict.set_result(granted)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        expired = 0
        while True:
            try:
                await self._poll(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading the quotas topic failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
            now = int(time.time() * 1000)
            if now - expired >= EXPIRE_EVERY_MS:
                self.book.expire(now)
                expired = now

    async def _write(self, record: Reserve | Settle) -> None:
        with map_kafka_errors("cannot write to the quotas topic"):
            async with asyncio.timeout(self.settings.producer_timeout_ms / 1000):
                await self.producer.send_and_wait(
                    self.topic, encode_record(record), key=record.tenant.encode(), headers=HEADERS
                )

    def headers(self, tenant: str) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of ``tenant``'s answers (none when it has no limits)."""
        if not self.enabled_for(tenant):
            return {}
        return ratelimit_headers(self.book.standing(tenant, int(time.time() * 1000)))

    async def submit_within(
        self, request_id: str, tenant: str, tokens: int, submit: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``submit`` if ``tenant``'s quotas have room for the request (RateLimited when not), reserving it.

        The reservation is written first and read back: the log's verdict is the answer (every gateway folds the
        same one). A reservation whose verdict does not come in time, or a submit that failed, is settled to nothing.
        """
        if not self.enabled_for(tenant):
            await submit()
            return
        out = self.book.admit(request_id, tenant, tokens, int(time.time() * 1000))
        if isinstance(out, Refusal):
            self._refused(out)
        verdict = self._verdicts[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self._write(out)
            try:
                async with asyncio.timeout(self.settings.producer_timeout_ms / 1000):
                    granted = await verdict
            except TimeoutError:
                raise KafkaUnavailable("the quotas topic was not read back in time: try again") from None
        except BaseException:
            await self._void(request_id, tenant)
            raise
        finally:
            self._verdicts.pop(request_id, None)
        if not granted:
            refusal = self.book.check(tenant, tokens, int(time.time() * 1000))
            self._refused(refusal or Refusal(Dimension.REQUESTS, BUCKET_MS, "rate limit reached"))
        try:
            await submit()
        except BaseException:
            await self._void(request_id, tenant)
            raise

    def _refused(self, refusal: Refusal) -> NoReturn:
        if self.metrics is not None:
            self.metrics.quota_refusals.labels(refusal.dimension.value).inc()
        raise RateLimited(refusal.message, dimension=refusal.dimension.value, retry_after_ms=refusal.retry_after_ms)

    async def _void(self, request_id: str, tenant: str) -> None:
        """Free a reservation whose request was not submitted (a Settle of 0 tokens; harmless if it was never
        granted)."""
        self.book.release(request_id)
        with contextlib.suppress(Exception):
            await asyncio.shield(self.settle(request_id, tenant, 0))

    async def settle(self, request_id: str, tenant: str, tokens: int) -> None:
        """Record what a request used in the end (0 when it was not submitted after all); frees its slot."""
        self.book.release(request_id)
        try:
            await self._write(Settle(request_id, tenant, int(time.time() * 1000), tokens))
        except KafkaUnavailable as exc:
            log.warning("request %s: its quota settlement was not written (%s); its lease frees it", request_id, exc)

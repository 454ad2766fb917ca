"""The events partitions a gateway reads, folded into a QueueBook: queue deadlines no worker can act on, quota
settlements when requests end, and the queue's depth for /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.cluster.queued import Ended, QueueBook, Waiting
from gateway.cluster.quota_log import QuotaLog
from gateway.fanout.source import Record
from schemas.codec import DELTA_BRANCH, Codec, peek_event, run_id_empty
from schemas.errors import DecodeError
from schemas.models import ModelDirectory
from schemas.records import Failed, TokenEvent
from services.kafka import map_kafka_errors, record_headers
from services.logs import bind_request
from services.requests import Producer
from services.settings import Settings

log = logging.getLogger(__name__)

TICK_S = 0.2  # deadlines are acted on within this (the contract: within a second)
RECHECK_MS = 1_000  # a request past its deadline whose model has a live worker is the worker's; looked at again then


class QueueWatch:
    """The hub's tap: decodes only Accepted records and the later events of the requests they name."""

    def __init__(
        self,
        settings: Settings,
        producer: Producer,
        codec: Codec,
        models: ModelDirectory,
        quotas: QuotaLog | None = None,
    ):
        self.settings = settings
        self.producer = producer
        self.codec = codec
        self.models = models
        self.quotas = quotas
        self.book = QueueBook()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the tap (synchronous, on the hub's read loop) ---

    def record(self, record: Record) -> None:
        key, value = record.key, record.value
        if key is None or not value:
            return
        # An Accepted starts a request's fold; of its later records, Deltas are skipped undecoded (the relay decodes
        # them only for requests someone watches, and the fold needs only Started and the end).
        if key not in self.book.keys:
            if not run_id_empty(value, key):
                return
        elif (head := peek_event(value)) is None or head.branch == DELTA_BRANCH:
            return
        try:
            ev = self.codec.decode_event(value)
        except DecodeError:
            return
        ended = self.book.feed(record.partition, ev)
        if ended is not None and self.quotas is not None and self.quotas.enabled_for(ended.tenant):
            self._spawn(self._settle(ended))

    def reassigned(self, gained: set[int], lost: set[int]) -> None:
        self.book.drop_partitions(lost)

    # --- deadlines ---

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-deadlines")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = int(time.time() * 1000)
            for waiting in self.book.due(now):
                if self.models.get(waiting.model, now) is not None:
                    self.book.recheck(waiting, now + RECHECK_MS)  # a live worker ends it when it reaches it
                else:
                    self._spawn(self._expire(waiting, now))

    async def _expire(self, waiting: Waiting, now: int) -> None:
        """End a request whose deadline passed while no worker served its model (its end comes back to the tap)."""
        bind_request(waiting.request_id)  # a task of its own (_spawn)
        message = f"the deadline passed while the request waited; no worker serves model {waiting.model!r}"
        event = TokenEvent(waiting.request_id, "", 0, now, Failed("deadline_exceeded", message))
        try:
            with map_kafka_errors("cannot end a request past its deadline"):
                async with asyncio.timeout(self.settings.producer_timeout_ms / 1000):
                    await self.producer.send_and_wait(
                        self.settings.events_topic,
                        self.codec.encode(event),
                        key=waiting.request_id.encode(),
                        headers=record_headers("TokenEvent"),
                    )
        except Exception as exc:
            log.warning("request %s: ending it at its deadline failed (%s); trying again", waiting.request_id, exc)
            self.book.recheck(waiting, int(time.time() * 1000) + RECHECK_MS)
            return
        log.info("request %s: deadline passed with no worker for model %s", waiting.request_id, waiting.model)

    async def _settle(self, ended: Ended) -> None:
        assert self.quotas is not None
        await self.quotas.settle(ended.request_id, ended.tenant, ended.tokens)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class QueueCollector(Collector):
    """The waiting requests of the partitions this gateway reads, per model, class and tenant (sum over gateways)."""

    def __init__(self, watch: QueueWatch):
        self.watch = watch

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "tokenrelay_gateway_queued_requests",
            "Accepted requests not started yet, in the events partitions this gateway reads (sum over gateways for "
            "the fleet), per model, class and tenant.",
            labels=["model", "priority", "tenant"],
        )
        oldest = GaugeMetricFamily(
            "tokenrelay_gateway_queue_oldest_wait_seconds",
            "How long the oldest of those requests has waited, per model, class and tenant.",
            labels=["model", "priority", "tenant"],
        )
        now = int(time.time() * 1000)
        for (model, priority, tenant), d in sorted(self.watch.book.depths().items()):
            depth.add_metric([model, priority, tenant], d.count)
            oldest.add_metric([model, priority, tenant], max(0, now - d.oldest_ms) / 1000)
        yield depth
        yield oldest

"""Backlog of the requests topic: the worker group's lag, polled in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Gauge

from services.kafka import make_admin, make_consumer, map_kafka_errors, start_client
from services.settings import Settings

log = logging.getLogger(__name__)


class BacklogMonitor:
    """Requests in the topic that the worker group has not committed yet; -1 until first measured."""

    def __init__(self, settings: Settings, gauge: Gauge | None = None, interval_s: float = 2.0):
        self.settings = settings
        self.gauge = gauge
        self.interval_s = interval_s
        self.backlog = -1
        self._task: asyncio.Task[None] | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._admin = make_admin(self.settings, client_id="tokenrelay-gw")
        await start_client(self._admin)
        self._consumer = make_consumer(self.settings)
        await start_client(self._consumer)
        self._task = asyncio.create_task(self._run(), name="backlog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def _run(self) -> None:
        while True:
            try:
                self.backlog = await self.measure()
                if self.gauge is not None:
                    self.gauge.set(self.backlog)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot measure the request backlog: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def topics_present(self, names: set[str]) -> bool:
        """Whether the broker answers and lists every one of these topics (the gateway's readiness)."""
        assert self._admin is not None
        with map_kafka_errors("cannot list topics"):
            return names <= set(await self._admin.list_topics())

    async def measure(self) -> int:
        assert self._admin is not None and self._consumer is not None
        with map_kafka_errors("cannot measure the request backlog"):
            return await self._measure(self._admin, self._consumer)

    async def _measure(self, admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer) -> int:
        topic = self.settings.requests_topic
        # The admin client asks the broker: a consumer's cached metadata knows only topics it has assigned, so it
        # would see no partitions here and report an empty backlog forever.
        (described,) = await admin.describe_topics([topic])
        tps = [
            TopicPartition(topic, p["partition"]) for p in sorted(described["partitions"], key=lambda p: p["partition"])
        ]
        if not tps:
            return 0
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        committed = await admin.list_consumer_group_offsets(self.settings.worker_group, partitions=tps)
        lag = 0
        for tp in tps:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
            lag += max(0, ends[tp] - max(done, starts[tp]))
        return lag

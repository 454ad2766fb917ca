"""Backlog of each model's requests topic: its worker group's lag, polled in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Gauge

from services.kafka import make_admin, make_consumer, map_kafka_errors, start_client
from services.settings import Settings

log = logging.getLogger(__name__)


class BacklogMonitor:
    """Requests of each model that its worker group has not committed yet; -1 until first measured."""

    def __init__(
        self,
        settings: Settings,
        gauge: Gauge | None = None,
        interval_s: float = 2.0,
        models: Callable[[], Iterable[str]] | None = None,
    ):
        self.settings = settings
        self.gauge = gauge
        self.interval_s = interval_s
        self.models = models or (lambda: [settings.default_model])
        self.backlogs: dict[str, int] = {}
        # The cluster's topics as last listed (None until then): a model whose requests topic is not among them is
        # not routed to, so a request is never parked on (or kept waiting for metadata of) a topic that is not there.
        self.request_topics: set[str] | None = None
        self._listed_at = 0.0
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

    @property
    def backlog(self) -> int:
        """All models' backlogs together; -1 until one was measured."""
        return sum(self.backlogs.values()) if self.backlogs else -1

    def backlog_of(self, model: str) -> int:
        return self.backlogs.get(model, -1)

    def servable(self, model: str) -> bool:
        """Whether ``model``'s requests topic exists as far as the last listing knows (True before any listing)."""
        return self.request_topics is None or self.settings.requests_topic_for(model) in self.request_topics

    async def refresh_topics(self, min_age_s: float = 1.0) -> None:
        """List the cluster's topics again, unless that was done in the last ``min_age_s``."""
        loop = asyncio.get_running_loop()
        if self._admin is None or loop.time() - self._listed_at < min_age_s:
            return
        self._listed_at = loop.time()
        with map_kafka_errors("cannot list topics"):
            self.request_topics = set(await self._admin.list_topics())

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh_topics(min_age_s=0.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot list the cluster's topics: %s", exc)
            for model in list(self.models()):
                try:
                    self.backlogs[model] = await self.measure(model)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("cannot measure the request backlog of model %s: %s", model, exc)
            if self.gauge is not None and self.backlogs:
                self.gauge.set(self.backlog)
            await asyncio.sleep(self.interval_s)

    async def topics_present(self, names: set[str]) -> bool:
        """Whether the broker answers and lists every one of these topics (the gateway's readiness)."""
        assert self._admin is not None
        with map_kafka_errors("cannot list topics"):
            return names <= set(await self._admin.list_topics())

    async def measure(self, model: str) -> int:
        assert self._admin is not None and self._consumer is not None
        with map_kafka_errors("cannot measure the request backlog"):
            return await self._measure(self._admin, self._consumer, model)

    async def _measure(self, admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, model: str) -> int:
        topic = self.settings.requests_topic_for(model)
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
        committed = await admin.list_consumer_group_offsets(self.settings.worker_group_for(model), partitions=tps)
        lag = 0
        for tp in tps:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
            lag += max(0, ends[tp] - max(done, starts[tp]))
        return lag

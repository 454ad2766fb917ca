"""Consumer lag of the stack's consumer groups (workers per model, gateways, analytics), read now and then, for
Prometheus: the records each group has not committed yet, per topic."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.kafka import make_admin, make_consumer, map_kafka_errors, start_client
from services.settings import Settings

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 15.0  # one read per scrape interval of the shipped Prometheus config: a handful of small requests


def lag_by_topic(committed: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int]) -> dict[str, int]:
    """Records past each partition's committed offset, summed per topic; a partition never committed (-1) or whose end
    is unknown counts nothing (the group has not started on it)."""
    lag: dict[str, int] = {}
    for tp, offset in committed.items():
        end = ends.get(tp)
        if offset < 0 or end is None:
            continue
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - offset)
    return lag


class LagCollector(Collector):
    """``tokenrelay_consumer_lag{group, topic}`` from the last reading (nothing before the first)."""

    def __init__(self) -> None:
        self.lags: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tokenrelay_consumer_lag",
            "Records of a topic that a consumer group has not committed yet, by group and topic (read every "
            f"{LAG_INTERVAL_S:g} s by analytics).",
            labels=["group", "topic"],
        )
        for (group, topic), lag in sorted(self.lags.items()):
            family.add_metric([group, topic], lag)
        yield family


class LagReader:
    """Reads the committed offsets of every consumer group named with the topic prefix, and the topics' ends."""

    def __init__(self, settings: Settings, collector: LagCollector):
        self.settings = settings
        self.collector = collector
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def read(self) -> None:
        if self._admin is None or self._consumer is None:
            self._admin = make_admin(self.settings, client_id="tokenrelay-lag")
            await start_client(self._admin)
            self._consumer = make_consumer(self.settings, client_id="tokenrelay-lag")
            await start_client(self._consumer)
        with map_kafka_errors("cannot read consumer lag"):
            listed = await self._admin.list_consumer_groups()
            groups = sorted(str(g[0]) for g in listed if str(g[0]).startswith(self.settings.topic_prefix))
            committed: dict[str, dict[TopicPartition, int]] = {}
            for group in groups:
                offsets = await self._admin.list_consumer_group_offsets(group)
                committed[group] = {tp: meta.offset for tp, meta in offsets.items()}
            tps = sorted({tp for offsets in committed.values() for tp in offsets})
            ends = await self._consumer.end_offsets(tps) if tps else {}
        self.collector.lags = {
            (group, topic): lag for group in groups for topic, lag in lag_by_topic(committed[group], ends).items()
        }

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

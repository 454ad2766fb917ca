"""The consumer-lag reader on a real broker: per group and topic, only the stack's groups (named with its prefix)."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from services.kafka import make_consumer, make_producer, record_headers, start_client
from services.lag import LagCollector, LagReader
from services.settings import Settings
from services.topics import ensure_topics

pytestmark = pytest.mark.integration


async def _commit(settings: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = make_consumer(settings, group_id=group)
    await start_client(consumer)
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()})
    finally:
        await consumer.stop()


async def test_lag_per_group_and_topic(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, requests_partitions=2)
    await ensure_topics(settings)
    topic = settings.requests_topic
    producer = make_producer(settings)
    await start_client(producer)
    try:
        for partition, count in ((0, 5), (1, 3)):
            for i in range(count):
                await producer.send_and_wait(
                    topic, b"x", key=f"k{i}".encode(), partition=partition, headers=record_headers("InferenceRequest")
                )
    finally:
        await producer.stop()
    workers = settings.worker_group
    await _commit(settings, workers, {TopicPartition(topic, 0): 2, TopicPartition(topic, 1): 3})
    await _commit(settings, f"elsewhere-{topic_prefix}", {TopicPartition(topic, 0): 0})  # not this stack's group

    collector = LagCollector()
    reader = LagReader(settings, collector)
    try:
        await reader.read()
    finally:
        await reader.close()
    assert collector.lags == {(workers, topic): 3}
    (family,) = collector.collect()
    assert [(s.labels, s.value) for s in family.samples] == [({"group": workers, "topic": topic}, 3)]

"""Topic admin and Avro-framed records on a real Apache Kafka broker."""

from __future__ import annotations

import asyncio

import pytest

from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from schemas.records import Delta, Finished, InferenceRequest, Started, TokenEvent, Usage
from services.kafka import header_value, make_consumer, make_producer, record_headers, start_client
from services.settings import Settings
from services.topics import describe_topics, ensure_topics

pytestmark = pytest.mark.integration


def _settings(kafka_bootstrap: str, topic_prefix: str) -> Settings:
    return Settings.from_env({}, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, events_partitions=4)


async def test_topic_creation_is_idempotent(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix)
    first = await ensure_topics(settings)
    second = await ensure_topics(settings)
    assert sorted(first) == sorted(
        [
            settings.requests_topic,
            settings.requests_topic_for(settings.served_model, "batch"),
            settings.events_topic,
            settings.control_topic,
            settings.dlq_topic,
            settings.models_topic,
            settings.files_topic,
            settings.batches_topic,
            settings.quotas_topic,
        ]
    )
    assert second == []
    counts = await describe_topics(settings)
    assert counts[settings.events_topic] == 4
    assert counts[settings.requests_topic] == settings.requests_partitions


async def test_concurrent_creation_is_harmless(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix)
    results = await asyncio.gather(*(ensure_topics(settings) for _ in range(3)))
    assert all(name.startswith(topic_prefix) for created in results for name in created)
    assert all(v > 0 for v in (await describe_topics(settings)).values())


async def test_avro_framed_records_round_trip_through_kafka(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    codec = default_codec()
    rid = new_request_id()
    events = [
        TokenEvent(rid, "r1", 0, 1, Started("w", "m", 3, 0)),
        TokenEvent(rid, "r1", 1, 2, Delta("héllo 🙂", (1, 2))),
        TokenEvent(rid, "r1", 2, 3, Finished("length", Usage(3, 2))),
    ]
    producer = make_producer(settings)
    await start_client(producer)
    try:
        await producer.send_and_wait(
            settings.requests_topic,
            codec.encode(InferenceRequest(rid, "p", 2)),
            key=rid.encode(),
            headers=record_headers("InferenceRequest"),
        )
        for event in events:
            meta = await producer.send_and_wait(
                settings.events_topic, codec.encode(event), key=rid.encode(), headers=record_headers("TokenEvent")
            )
            # The gateway finds a request's partition by the same murmur2 hash the producer uses.
            assert meta.partition == partition_for_key(rid, 4)
    finally:
        await producer.stop()

    consumer = make_consumer(settings, settings.events_topic, group_id=None)
    await start_client(consumer)
    try:
        got: list[TokenEvent] = []
        async with asyncio.timeout(30):
            while len(got) < len(events):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        assert header_value(
                            record.headers,
                            "content-type",
                        ).startswith("application/avro")  # type: ignore[union-attr]
                        got.append(codec.decode_event(record.value))
        assert got == events
    finally:
        await consumer.stop()

"""The relay's event source on Kafka: the gateways' group consumer (its partitions only), plus a pool for replays."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from gateway.cluster.group import GroupReader, Reassign
from gateway.cluster.owners import Owners
from gateway.fanout.source import SourceRecord
from schemas.errors import KafkaUnavailable
from services.kafka import make_consumer, map_kafka_errors, read_key, start_client
from services.settings import Settings
from services.topics import describe_topics

log = logging.getLogger(__name__)

REPLAY_POOL_SIZE = 4
REPLAY_TIMEOUT_S = 10.0


class KafkaEventSource:
    """Reads the events partitions the gateways' group assigns to this one, each from its end when assigned;
    replays one key's records of any partition on demand."""

    def __init__(self, settings: Settings, owners: Owners):
        self.settings = settings
        self.topic = settings.events_topic
        self.partitions = settings.events_partitions
        self.reader = GroupReader(settings, owners)
        self._pool: asyncio.Queue[AIOKafkaConsumer] = asyncio.Queue()
        self._pool_size = 0
        self._all: list[AIOKafkaConsumer] = []

    def on_reassign(self, callback: Reassign) -> None:
        """Called with (gained partitions and their start offsets, lost partitions, start time) at each rebalance."""
        self.reader.on_reassign = callback

    async def start(self) -> tuple[dict[int, int], int]:
        self.partitions = len(await self._partitions())
        return await self.reader.start()

    async def _partitions(self) -> list[int]:
        deadline = time.monotonic() + 60
        while True:
            count = (await describe_topics(self.settings)).get(self.topic, 0)
            if count:
                return list(range(count))
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"topic {self.topic} not found")
            await asyncio.sleep(0.2)

    async def poll(self) -> list[ConsumerRecord[bytes, bytes]]:
        # aiokafka's records as they are (same attribute names as SourceRecord): nothing is copied per record
        return await self.reader.poll()

    async def _borrow(self) -> AIOKafkaConsumer:
        if self._pool.empty() and self._pool_size < REPLAY_POOL_SIZE:
            self._pool_size += 1
            consumer = make_consumer(self.settings, max_partition_fetch_bytes=4 << 20, fetch_max_wait_ms=10)
            try:
                await start_client(consumer, timeout_s=10)
            except BaseException:
                self._pool_size -= 1
                raise
            self._all.append(consumer)
            return consumer
        return await self._pool.get()

    async def replay(self, partition: int, from_time_ms: int, stop_offset: int, key: bytes) -> list[SourceRecord]:
        consumer = await self._borrow()
        tp = TopicPartition(self.topic, partition)
        try:
            with map_kafka_errors("cannot replay from Kafka"):
                if consumer.assignment() != {tp}:
                    consumer.assign([tp])  # reassigning resets the fetcher and its metadata: only on a change
                records = read_key(consumer, tp, key, from_time_ms, stop_offset)
                return await asyncio.wait_for(self._collect(records), REPLAY_TIMEOUT_S)
        finally:
            self._pool.put_nowait(consumer)

    @staticmethod
    async def _collect(records: AsyncIterator[ConsumerRecord[bytes, bytes]]) -> list[SourceRecord]:
        return [
            SourceRecord(r.partition, r.offset, r.key, r.value or b"", r.timestamp, r.headers) async for r in records
        ]

    async def log_start(self, partition: int) -> int:
        consumer = await self._borrow()
        try:
            tp = TopicPartition(self.topic, partition)
            with map_kafka_errors("cannot read the log start"):
                return int((await consumer.beginning_offsets([tp]))[tp])
        finally:
            self._pool.put_nowait(consumer)

    async def log_end(self, partition: int) -> int:
        consumer = await self._borrow()
        try:
            tp = TopicPartition(self.topic, partition)
            with map_kafka_errors("cannot read the log end"):
                return int((await consumer.end_offsets([tp]))[tp])
        finally:
            self._pool.put_nowait(consumer)

    async def stop(self) -> None:
        await self.reader.stop()
        await asyncio.gather(*(c.stop() for c in self._all), return_exceptions=True)

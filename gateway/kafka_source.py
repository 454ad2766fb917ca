"""The hub's event source on Kafka: one assigned (group-less) consumer, plus a small pool for replays."""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.hub import SourceRecord
from schemas.errors import KafkaUnavailable
from services.kafka import make_consumer, start_client, translate
from services.settings import Settings

log = logging.getLogger(__name__)

REPLAY_POOL_SIZE = 4
REPLAY_TIMEOUT_S = 10.0


class KafkaEventSource:
    """Reads every partition of the events topic from its end; replays one key's records on demand."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.topic = settings.events_topic
        self.partitions = settings.events_partitions
        self._consumer: AIOKafkaConsumer | None = None
        self._pool: asyncio.Queue[AIOKafkaConsumer] = asyncio.Queue()
        self._pool_size = 0
        self._all: list[AIOKafkaConsumer] = []

    async def start(self) -> tuple[dict[int, int], int]:
        consumer = make_consumer(self.settings, max_partition_fetch_bytes=4 << 20, fetch_max_wait_ms=20)
        await start_client(consumer)
        self._consumer = consumer
        partitions = await self._partitions(consumer)
        self.partitions = len(partitions)
        tps = [TopicPartition(self.topic, p) for p in partitions]
        consumer.assign(tps)
        started_ms = int(time.time() * 1000)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])
        return {tp.partition: ends[tp] for tp in tps}, started_ms

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[int]:
        deadline = time.monotonic() + 60
        while True:
            parts = consumer.partitions_for_topic(self.topic)
            if parts:
                return sorted(parts)
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"topic {self.topic} not found")
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)

    async def poll(self) -> list[SourceRecord]:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
        out: list[SourceRecord] = []
        for tp, records in batches.items():
            for r in records:
                if r.value is not None:
                    out.append(SourceRecord(tp.partition, r.offset, r.key, r.value, r.timestamp))
        return out

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
            return await asyncio.wait_for(self._replay(consumer, tp, from_time_ms, stop_offset, key), REPLAY_TIMEOUT_S)
        except KafkaError as exc:
            raise translate(exc) from exc
        except TimeoutError as exc:
            raise KafkaUnavailable("replay from Kafka timed out") from exc
        finally:
            self._pool.put_nowait(consumer)

    async def _replay(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, from_time_ms: int, stop_offset: int, key: bytes
    ) -> list[SourceRecord]:
        if consumer.assignment() != {tp}:
            consumer.assign([tp])  # reassigning resets the fetcher and its metadata: only when the partition changes
        found = await consumer.offsets_for_times({tp: from_time_ms})
        start = found[tp].offset if found.get(tp) is not None else stop_offset
        out: list[SourceRecord] = []
        if start >= stop_offset:
            return out
        consumer.seek(tp, start)
        position = start
        while position < stop_offset:
            batches = await consumer.getmany(tp, timeout_ms=200, max_records=10_000)
            for r in batches.get(tp, ()):
                position = r.offset + 1
                if r.offset >= stop_offset:
                    break
                if r.key == key and r.value is not None:
                    out.append(SourceRecord(tp.partition, r.offset, r.key, r.value, r.timestamp))
            if not batches:
                # Transaction markers or compaction gaps: trust the consumer's position.
                position = max(position, await consumer.position(tp))
        return out

    async def log_start(self, partition: int) -> int:
        consumer = await self._borrow()
        try:
            tp = TopicPartition(self.topic, partition)
            return int((await consumer.beginning_offsets([tp]))[tp])
        except KafkaError as exc:
            raise translate(exc) from exc
        finally:
            self._pool.put_nowait(consumer)

    async def stop(self) -> None:
        clients = [c for c in (self._consumer, *self._all) if c is not None]
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)

"""The Batch API's state in Kafka: the compacted batches topic followed into memory, and file contents in chunks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.api.context import Producer
from gateway.batch.objects import BatchState, FileMeta
from schemas.errors import KafkaUnavailable, NotFound
from services.kafka import make_consumer, map_kafka_errors, start_client
from services.settings import Settings
from services.topics import describe_topics

log = logging.getLogger(__name__)

CHUNK_BYTES = 128 * 1024  # well under the broker's default message.max.bytes (1 MB)
SYNC_TIMEOUT_S = 10.0
JSON_HEADERS = [("content-type", b"application/json")]
CHUNK_HEADERS = [("content-type", b"application/jsonl")]
FILE, BATCH, CANCEL = "file:", "batch:", "cancel:"


class BatchStore:
    """Every gateway's copy of the Batch API's objects, read from the compacted ``batches`` topic.

    Keys: ``file:<id>`` (a file's metadata; a tombstone deletes it), ``batch:<id>`` (a batch object, written by its
    creator and then only by its driver) and ``cancel:<id>`` (a cancel asked for, by any gateway). ``sync`` waits
    until this copy has read everything written before the call, so any gateway answers what any other wrote.
    """

    def __init__(self, settings: Settings, producer: Producer):
        self.settings = settings
        self.producer = producer
        self.files: dict[str, FileMeta] = {}
        self.batches: dict[str, BatchState] = {}
        self.cancels: dict[str, int] = {}
        self._tp = TopicPartition(settings.batches_topic, 0)
        self._consumer = make_consumer(settings)
        self._content = make_consumer(settings, max_partition_fetch_bytes=4 * CHUNK_BYTES)
        self._content_lock = asyncio.Lock()
        self._position = 0
        self._moved = asyncio.Event()
        self.changed = asyncio.Event()  # set (and replaced) whenever a batch record is applied
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await start_client(self._consumer)
        await start_client(self._content)
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        self._task = asyncio.create_task(self._follow(), name="batch-store")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()
        await self._content.stop()

    async def _follow(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(self._tp, timeout_ms=200, max_records=5_000)
                for record in batches.get(self._tp, []):
                    self._apply(record.key or b"", record.value)
                self._position = await self._consumer.position(self._tp)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading %s failed (will retry): %s", self._tp.topic, exc)
                await asyncio.sleep(1.0)
                continue
            self._moved.set()
            self._moved = asyncio.Event()

    def _apply(self, key: bytes, value: bytes | None) -> None:
        text = key.decode("utf-8", "replace")
        try:
            if text.startswith(FILE):
                if value is None:
                    self.files.pop(text[len(FILE) :], None)
                else:
                    self.files[text[len(FILE) :]] = FileMeta.from_json(value)
            elif text.startswith(BATCH) and value is not None:
                self.batches[text[len(BATCH) :]] = BatchState.from_json(value)
                self.changed.set()
                self.changed = asyncio.Event()
            elif text.startswith(CANCEL) and value is not None:
                self.cancels[text[len(CANCEL) :]] = json.loads(value)["cancelling_at"]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("skipping an unreadable record %s of %s: %s", text[:80], self._tp.topic, exc)

    async def sync(self) -> None:
        """Until everything written to the topic before this call has been read into this copy."""
        with map_kafka_errors("cannot read the batches topic"):
            end = (await self._consumer.end_offsets([self._tp]))[self._tp]
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while self._position < end:
            moved = self._moved
            left = deadline - time.monotonic()
            if left <= 0:
                raise KafkaUnavailable("the batches topic is not being read")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), left)

    # --- writes (acknowledged by the broker, then read back like any other record) ---------------------------

    async def _put(self, key: str, value: bytes | None) -> None:
        with map_kafka_errors("cannot write to the batches topic"):
            async with asyncio.timeout(self.settings.producer_timeout_ms / 1000):
                await self.producer.send_and_wait(self._tp.topic, value, key=key.encode(), headers=JSON_HEADERS)
        # Not applied here: the copy changes only by reading the topic, in its order (a write applied early would be
        # undone by an older record read after it). ``sync`` gives a caller its own writes.

    async def put_file(self, meta: FileMeta) -> None:
        await self._put(FILE + meta.id, meta.to_json())

    async def delete_file(self, file_id: str) -> None:
        await self._put(FILE + file_id, None)

    async def put_batch(self, state: BatchState) -> None:
        await self._put(BATCH + state.id, state.to_json())

    async def put_cancel(self, batch_id: str, cancelling_at: int) -> None:
        await self._put(CANCEL + batch_id, json.dumps({"cancelling_at": cancelling_at}).encode())

    async def save_file(self, meta: FileMeta, data: bytes) -> FileMeta:
        """Store a file's contents, then its metadata (which makes it visible): the metadata as stored."""
        meta.partition, meta.offsets = await self.write_content(meta.id, data)
        meta.size = len(data)
        await self.put_file(meta)
        return meta

    # --- file contents -----------------------------------------------------------------------------------------------

    async def write_content(self, file_id: str, data: bytes) -> tuple[int, list[int]]:
        """Store ``data`` in chunks keyed by the file id: the partition and the offsets of its chunks, in order."""
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        topic, key = self.settings.files_topic, file_id.encode()
        with map_kafka_errors("cannot store the file"):
            async with asyncio.timeout(self.settings.producer_timeout_ms / 1000):
                sent = await asyncio.gather(
                    *(self.producer.send_and_wait(topic, chunk, key=key, headers=CHUNK_HEADERS) for chunk in chunks)
                )
        return sent[0].partition, [m.offset for m in sent]

    async def read_content(self, meta: FileMeta) -> bytes:
        """A file's bytes from its chunks; NotFound (``expired``) when retention has deleted them."""
        tp = TopicPartition(self.settings.files_topic, meta.partition)
        wanted = set(meta.offsets)
        found: dict[int, bytes] = {}
        async with self._content_lock:
            with map_kafka_errors("cannot read the file"):
                if self._content.assignment() != {tp}:
                    self._content.assign([tp])
                start = (await self._content.beginning_offsets([tp]))[tp]
                if meta.offsets and min(meta.offsets) < start:
                    raise NotFound(f"the contents of file {meta.id} have expired", code="expired")
                self._content.seek(tp, min(meta.offsets, default=0))
                deadline = time.monotonic() + SYNC_TIMEOUT_S
                while len(found) < len(wanted):
                    if time.monotonic() > deadline:
                        raise KafkaUnavailable(f"cannot read the contents of file {meta.id}")
                    batches = await self._content.getmany(tp, timeout_ms=200)
                    for record in batches.get(tp, []):
                        if record.offset in wanted and record.key == meta.id.encode():
                            found[record.offset] = record.value or b""
        return b"".join(found[offset] for offset in meta.offsets)


async def produced_keys(settings: Settings, topics: Iterable[str], keys: set[bytes], since_ms: int) -> set[bytes]:
    """Which of ``keys`` have a record in ``topics`` from ``since_ms`` on (every partition, to its current end)."""
    found: set[bytes] = set()
    consumer: AIOKafkaConsumer = make_consumer(settings)
    await start_client(consumer)
    try:
        with map_kafka_errors("cannot read the requests topics"):
            counts = await describe_topics(settings, sorted(topics))
            tps = [TopicPartition(topic, p) for topic, count in counts.items() for p in range(count)]
            if not tps:
                return found
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            starts = await consumer.offsets_for_times(dict.fromkeys(tps, max(0, since_ms)))
            pending = []
            for tp in tps:
                at = starts.get(tp)
                if at is None or at.offset >= ends[tp]:
                    continue
                consumer.seek(tp, at.offset)
                pending.append(tp)
            while pending:
                batches = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
                for records in batches.values():
                    found.update(r.key for r in records if r.key in keys)
                pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]
    finally:
        await consumer.stop()
    return found

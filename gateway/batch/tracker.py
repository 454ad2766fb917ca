"""A batch's lines as the events log tells them: each line's events folded into its endpoint's answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from gateway.batch.answers import LineRecord, LineResult, line_result
from schemas.codec import Codec
from schemas.errors import DecodeError
from schemas.ids import CLOCK_SKEW_MS
from schemas.view import View, ViewEvent
from services.kafka import make_consumer, start_client
from services.settings import Settings

log = logging.getLogger(__name__)

RETRY_S = 1.0


@dataclass(slots=True)
class Line:
    """One line of a batch: where it is in the file, what it asks, and (once it ended) its answer."""

    line: int
    custom_id: str
    url: str
    record: LineRecord | None  # None: the line's body no longer makes a record (its result says why)
    result: LineResult | None = None
    view: View | None = None
    events: list[ViewEvent] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        assert self.record is not None
        return self.record.request.request_id


class LineTracker:
    """Reads the events topic from the batch's creation on and ends each line with its endpoint's answer.

    Only the keys of the batch's lines are decoded. Results are what the log says, so a tracker started again
    (another gateway, after a crash) reaches the same results.
    """

    def __init__(self, settings: Settings, codec: Codec, lines: list[Line], since_ms: int, partitions: int):
        self.settings = settings
        self.partitions = partitions  # of the events topic
        self.codec = codec
        self.by_key = {line.request_id.encode(): line for line in lines if line.record is not None}
        self.since_ms = since_ms - CLOCK_SKEW_MS
        self.ended = sum(1 for line in lines if line.result is not None)
        self.changed = asyncio.Event()
        self._consumer = make_consumer(settings, max_partition_fetch_bytes=4 * 1024 * 1024)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await start_client(self._consumer)
        self._task = asyncio.create_task(self._run(), name="batch-tracker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _seek(self) -> list[TopicPartition]:
        topic = self.settings.events_topic
        tps = [TopicPartition(topic, p) for p in range(self.partitions)]
        self._consumer.assign(tps)
        starts = await self._consumer.offsets_for_times(dict.fromkeys(tps, max(0, self.since_ms)))
        # Nothing that new yet: from the end as of now. Not seek_to_end, which resolves the end later and so skips
        # whatever arrives in between.
        ends = await self._consumer.end_offsets(tps)
        for tp in tps:
            at = starts.get(tp)
            self._consumer.seek(tp, ends[tp] if at is None else at.offset)
        return tps

    async def _run(self) -> None:
        while True:
            try:
                tps = await self._seek()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("batch tracker: cannot position on the events log (will retry): %s", exc)
                await asyncio.sleep(RETRY_S)
        while True:
            try:
                batches = await self._consumer.getmany(*tps, timeout_ms=500, max_records=10_000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("batch tracker: reading the events log failed (will retry): %s", exc)
                await asyncio.sleep(RETRY_S)
                continue
            for records in batches.values():
                for record in records:
                    line = self.by_key.get(record.key or b"")
                    if line is not None and line.result is None and record.value is not None:
                        self._feed(line, record.offset, record.value)
            if batches:
                self.changed.set()

    def _feed(self, line: Line, offset: int, value: bytes) -> None:
        try:
            event = self.codec.decode_event(value)
        except DecodeError as exc:
            log.warning("batch line %s: undecodable event at offset %d: %s", line.request_id, offset, exc)
            return
        if line.view is None:
            line.view = View(line.request_id)
        out = line.view.feed(offset, event)
        if out is None:
            return
        line.events.append(out)
        if out.terminal:
            assert line.record is not None
            request = line.record.request
            line.result = line_result(
                line.url, request.request_id, request.model, line.record.accepted, line.events, request
            )
            line.view, line.events = None, []
            self.ended += 1

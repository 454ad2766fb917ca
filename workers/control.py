"""Control topic reader: every worker reads all of it, from the start of its retention, so no cancel is missed."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from schemas.codec import Codec, default_codec
from schemas.errors import DecodeError, UnknownSchemaId
from services import tracing
from services.kafka import start_client
from services.logs import request_context

log = logging.getLogger(__name__)

RETRY_S = 1.0


class CancelledIds:
    """The most recent cancelled request ids, bounded."""

    def __init__(self, limit: int = 100_000):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids


class ControlReader:
    """Calls ``on_cancel(request_id)`` for every cancel in the control topic; ``ready`` once caught up.

    Reading from the oldest retained record (not the end) means a worker that starts after a cancel was sent still
    honours it: cancels sent while no worker was alive are not lost.
    """

    def __init__(
        self, consumer: AIOKafkaConsumer, topic: str, on_cancel: Callable[[str], None], codec: Codec | None = None
    ):
        self._consumer = consumer
        self._topic = topic
        self._on_cancel = on_cancel
        self._codec = codec or default_codec()
        self.ready = asyncio.Event()

    async def run(self, partitions: int) -> None:
        consumer = self._consumer
        await start_client(consumer, timeout_s=None)
        try:
            tps = [TopicPartition(self._topic, p) for p in range(max(1, partitions))]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            behind = {tp for tp in tps if ends[tp] > 0}
            if not behind:
                self.ready.set()
            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=500)
                    if behind:
                        behind = {tp for tp in behind if await consumer.position(tp) < ends[tp]}
                except KafkaError as exc:
                    log.warning("reading the control topic failed (will retry): %s", exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                for records in batches.values():
                    for record in records:
                        self._take(record.offset, record.value, record.headers)
                if not behind:
                    self.ready.set()
        finally:
            await consumer.stop()

    def _take(self, offset: int, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        try:
            event = self._codec.decode_control(value or b"")
        except DecodeError as exc:
            if not isinstance(exc, UnknownSchemaId):
                log.warning("undecodable control record at offset %d: %s", offset, exc)
            return
        if event.action == "cancel":
            with request_context(event.request_id):
                log.info("request %s: cancel received", event.request_id)
                if tracing.enabled() and (trace := tracing.record_trace(headers)):
                    attributes = {"tokenrelay.request_id": event.request_id, "tokenrelay.reason": event.reason or ""}
                    tracing.start_span(tracing.CANCEL, trace, kind="consumer", attributes=attributes).end()
                self._on_cancel(event.request_id)

"""Control topic reader: every worker reads all of it, without a group, from the end at start."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from aiokafka import TopicPartition

from schemas.codec import default_codec
from schemas.errors import DecodeError
from services.kafka import make_consumer, start_client
from services.settings import Settings

log = logging.getLogger(__name__)


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
    """Calls ``on_cancel(request_id)`` for every cancel that arrives after start."""

    def __init__(self, settings: Settings, on_cancel: Callable[[str], None]):
        self._settings = settings
        self._on_cancel = on_cancel
        self._consumer = make_consumer(settings, auto_offset_reset="latest")
        self.ready = asyncio.Event()

    async def run(self, partitions: int) -> None:
        consumer = self._consumer
        await start_client(consumer)
        try:
            tps = [TopicPartition(self._settings.control_topic, p) for p in range(max(1, partitions))]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)
            self.ready.set()
            codec = default_codec()
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        try:
                            event = codec.decode_control(record.value)
                        except DecodeError as exc:
                            log.warning("undecodable control record at offset %d: %s", record.offset, exc)
                            continue
                        if event.action == "cancel":
                            log.info("request %s: cancel received", event.request_id)
                            self._on_cancel(event.request_id)
        finally:
            await consumer.stop()

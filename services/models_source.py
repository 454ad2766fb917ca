"""Follows the compacted models topic from its start into a ModelDirectory."""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from schemas.codec import Codec, default_codec
from schemas.errors import DecodeError, UnknownSchemaId
from schemas.models import ModelDirectory
from services.kafka import start_client

log = logging.getLogger(__name__)

RETRY_S = 1.0


class ModelsFollower:
    """Reads every announcement (partition 0 of the models topic); ``caught_up`` once the backlog is read."""

    def __init__(self, consumer: AIOKafkaConsumer, topic: str, directory: ModelDirectory, codec: Codec | None = None):
        self._consumer = consumer
        self._tp = TopicPartition(topic, 0)
        self.directory = directory
        self._codec = codec or default_codec()
        self.caught_up = asyncio.Event()

    async def run(self) -> None:
        consumer = self._consumer
        await start_client(consumer, timeout_s=None)
        try:
            consumer.assign([self._tp])
            await consumer.seek_to_beginning(self._tp)
            end = (await consumer.end_offsets([self._tp]))[self._tp]
            while True:
                try:
                    batches = await consumer.getmany(self._tp, timeout_ms=500)
                    if not self.caught_up.is_set() and await consumer.position(self._tp) >= end:
                        self.caught_up.set()
                except KafkaError as exc:
                    log.warning("reading the models topic failed (will retry): %s", exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                for record in batches.get(self._tp, ()):
                    try:
                        info = self._codec.decode_model_info(record.value or b"")
                    except DecodeError as exc:
                        if not isinstance(exc, UnknownSchemaId):
                            log.warning("undecodable model announcement at offset %d: %s", record.offset, exc)
                        continue
                    if not self.directory.feed(info, int(time.time() * 1000)):
                        log.warning(
                            "model announcement at offset %d ignored: %s of worker %s is stamped %d ms in the future",
                            record.offset,
                            info.name,
                            info.worker,
                            info.ts_ms - int(time.time() * 1000),
                        )
        finally:
            await consumer.stop()

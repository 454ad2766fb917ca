"""Model announcements: each served model's ModelInfo on the compacted models topic, as a heartbeat."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

from schemas.codec import Codec, default_codec
from schemas.records import ModelInfo
from services.kafka import record_headers
from workers.publisher import Publisher

log = logging.getLogger(__name__)

_HEADERS = record_headers("ModelInfo")
TTL_HEARTBEATS = 3


class Announcer:
    """Publishes every model's info now and then every ``interval_ms``; ``stop()`` says the models are gone."""

    def __init__(
        self, publisher: Publisher, topic: str, infos: Sequence[ModelInfo], interval_ms: int, codec: Codec | None = None
    ):
        self._publisher = publisher
        self._topic = topic
        self._infos = list(infos)
        self._interval_ms = interval_ms
        self._codec = codec or default_codec()

    def announce(self, ttl_ms: int | None = None) -> list[asyncio.Future[None]]:
        now = int(time.time() * 1000)
        ttl = self._interval_ms * TTL_HEARTBEATS if ttl_ms is None else ttl_ms
        sent = []
        for info in self._infos:
            record = dataclasses.replace(info, ts_ms=now, ttl_ms=ttl)
            sent.append(self._publisher.send(self._topic, info.name.encode(), self._codec.encode(record), _HEADERS))
        return sent

    async def run(self) -> None:
        while True:
            self.announce()
            await asyncio.sleep(self._interval_ms / 1000)

    async def withdraw(self) -> None:
        """Tell gateways at once that these models are no longer served here (ttl 0)."""
        results = await asyncio.gather(*self.announce(ttl_ms=0), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("could not withdraw a model announcement: %s", result)

"""Token event publishing: one ordered send path, and per-request coalescing of Deltas while the producer is behind."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from schemas.codec import default_codec
from schemas.records import Delta, Payload, TokenEvent
from services.kafka import record_headers

log = logging.getLogger(__name__)

_HEADERS = record_headers("TokenEvent")


@dataclass(slots=True)
class DeltaCoalescer:
    """Sends a Delta at once unless this request's previous Delta is still unacknowledged; then tokens pile up."""

    in_flight: bool = False
    text: str = ""
    token_ids: list[int] = field(default_factory=list)

    def add(self, token_ids: tuple[int, ...], text: str) -> Delta | None:
        self.token_ids.extend(token_ids)
        self.text += text
        if self.in_flight or not (self.token_ids or self.text):
            return None
        return self._take()

    def acked(self) -> Delta | None:
        self.in_flight = False
        return self._take() if (self.token_ids or self.text) else None

    def flush(self) -> Delta | None:
        """Whatever is pending, regardless of acks (before the terminal event)."""
        return self._take() if (self.token_ids or self.text) else None

    def _take(self) -> Delta:
        delta = Delta(self.text, tuple(self.token_ids))
        self.text, self.token_ids, self.in_flight = "", [], True
        return delta


class Publisher:
    """Serialises every event through one task so that events of a request reach the producer in seq order."""

    def __init__(self, producer: AIOKafkaProducer, topic: str):
        self._producer = producer
        self._topic = topic
        self._queue: asyncio.Queue[tuple[TokenEvent, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publisher")

    def publish(self, event: TokenEvent) -> asyncio.Future[None]:
        """Queue an event; the future resolves when the broker has acknowledged it."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.add(done)
        done.add_done_callback(self._pending.discard)
        self._queue.put_nowait((event, done))
        return done

    async def drain(self) -> None:
        """Wait until every event published so far is acknowledged (or failed)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        codec = default_codec()
        while True:
            event, done = await self._queue.get()
            try:
                ack = await self._producer.send(
                    self._topic, value=codec.encode(event), key=event.request_id.encode(), headers=_HEADERS
                )
            except Exception as exc:
                log.error("request %s: cannot publish seq %d: %s", event.request_id, event.seq, exc)
                if not done.done():
                    done.set_exception(exc)
                continue
            ack.add_done_callback(lambda f, d=done: _settle(f, d))


def _settle(ack: asyncio.Future[object], done: asyncio.Future[None]) -> None:
    if done.done():
        return
    if ack.cancelled():
        done.cancel()
    elif ack.exception() is not None:
        done.set_exception(ack.exception())  # type: ignore[arg-type]
    else:
        done.set_result(None)


@dataclass(slots=True)
class RunStream:
    """Events of one processing attempt: gap-free seq, coalesced Deltas; ignores everything once abandoned."""

    publisher: Publisher
    request_id: str
    run_id: str
    seq: int = 0
    coalescer: DeltaCoalescer = field(default_factory=DeltaCoalescer)
    abandoned: bool = False

    def emit(self, payload: Payload) -> asyncio.Future[None]:
        event = TokenEvent(self.request_id, self.run_id, self.seq, int(time.time() * 1000), payload)
        self.seq += 1
        return self.publisher.publish(event)

    def tokens(self, token_ids: tuple[int, ...], text: str) -> None:
        if self.abandoned:
            return
        delta = self.coalescer.add(token_ids, text)
        if delta is not None:
            self._send_delta(delta)

    def finish(self, payload: Payload) -> asyncio.Future[None]:
        """Send what is pending, then the terminal event; resolves when the terminal event is acknowledged."""
        delta = self.coalescer.flush()
        if delta is not None:
            self._send_delta(delta)
        return self.emit(payload)

    def _send_delta(self, delta: Delta) -> None:
        ack = self.emit(delta)
        ack.add_done_callback(self._on_ack)

    def _on_ack(self, _: asyncio.Future[None]) -> None:
        if self.abandoned:
            return
        delta = self.coalescer.acked()
        if delta is not None:
            self._send_delta(delta)

"""One subscriber of a request's stream: a backlog to send first, then a bounded queue of framed live events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.fanout.cursor import Cursor, encode_cursor, event_epoch
from gateway.fanout.sse import frame
from schemas.view import EventName, ViewEvent

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Out:
    """A view event, serialised and framed once for every subscriber."""

    event: ViewEvent
    epoch: int
    framed: bytes

    @property
    def offset(self) -> int:
        return self.event.offset


def make_out(partition: int, request_id: str, ev: ViewEvent) -> Out:
    epoch = event_epoch(request_id, ev.run_id, ev.seq)
    cursor = encode_cursor(Cursor(epoch, partition, ev.offset))
    return Out(ev, epoch, frame(ev.event, ev.data_json(), cursor))


def reset_frame(reason: str) -> bytes:
    return frame(EventName.RESET, json.dumps({"reason": reason}))


class Subscription:
    """One subscriber: a backlog to send first, then a bounded queue of live events."""

    def __init__(self, request_id: str, after_offset: int, maxsize: int, *, forwarded: bool = False):
        self.request_id = request_id
        self.forwarded = forwarded  # another gateway's upstream: ended (not moved along) when this one stops owning
        self.after_offset = after_offset
        self.preamble: list[bytes] = []
        self.backlog: list[Out] = []
        self.queue: asyncio.Queue[Out] = asyncio.Queue(maxsize)
        self.closed: str | None = None
        self.error: dict[str, str] | None = None  # why it was closed, for its client, when that is an error
        # Called when the hub drops this subscriber as slow: the handler aborts its connection there, since it may be
        # blocked writing to a peer that stopped reading (a dead peer would otherwise hold memory and an fd forever).
        self.on_slow: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, out: Out) -> bool:
        """Queue a live event; False when the subscriber is too slow and must go."""
        if out.offset <= self.after_offset:
            return True
        try:
            self.queue.put_nowait(out)
        except asyncio.QueueFull:
            return False
        self._wake()
        return True

    def close(self, reason: str, error: dict[str, str] | None = None) -> None:
        self.closed = reason
        self.error = error
        self._wake()
        if reason == "slow" and self.on_slow is not None:
            on_slow, self.on_slow = self.on_slow, None
            try:
                on_slow()
            except Exception:
                log.exception("request %s: aborting a slow subscriber failed", self.request_id)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout_s: float) -> Out | None:
        """Next live event; None on timeout or when closed."""
        if self.closed is not None:
            return None
        if self.queue.empty():
            # One future and one timer per wait (not two tasks and asyncio.wait): this is every subscriber's hot path.
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if self.closed is not None or self.queue.empty():
                return None
        return self.queue.get_nowait()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

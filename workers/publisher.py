"""Publishing: one ordered send path that survives producer failures, and runs that stop at their first lost event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaProducer

from schemas.codec import Codec, default_codec
from schemas.errors import TokenRelayError
from schemas.records import Delta, Payload, TokenEvent, TokenLogprob
from services.kafka import Headers, record_headers, start_client
from workers.stall import StallFence

log = logging.getLogger(__name__)

_HEADERS = record_headers("TokenEvent")
TICK_S = 0.1  # how often the stall fence is ticked


@dataclass(slots=True)
class _Pending:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class DeltaCoalescer:
    """Sends a Delta at once unless this request's previous Delta is still unacknowledged; then tokens pile up, one
    Delta's worth per choice (n > 1), sent in the order the choices first had tokens pending."""

    in_flight: bool = False
    pending: dict[int, _Pending] = field(default_factory=dict)

    def add(
        self, token_ids: tuple[int, ...], text: str, index: int = 0, logprobs: tuple[TokenLogprob, ...] = ()
    ) -> list[Delta]:
        if token_ids or text:
            piece = self.pending.setdefault(index, _Pending())
            piece.token_ids.extend(token_ids)
            piece.text += text
            piece.logprobs.extend(logprobs)
        return [] if self.in_flight else self._take()

    def acked(self) -> list[Delta]:
        self.in_flight = False
        return self._take()

    def flush(self) -> list[Delta]:
        """Whatever is pending, regardless of acks (before the terminal event)."""
        return self._take()

    def _take(self) -> list[Delta]:
        deltas = [Delta(p.text, tuple(p.token_ids), i, tuple(p.logprobs)) for i, p in self.pending.items()]
        self.pending = {}
        self.in_flight = self.in_flight or bool(deltas)
        return deltas


class EventSink(Protocol):
    """Where runs publish their events: the Publisher, or a recorder in unit tests."""

    def publish(self, event: TokenEvent, headers: Headers | None = None) -> asyncio.Future[None]: ...


class RunBroken(TokenRelayError):
    """An event of this run was not acknowledged, so nothing after it may be published."""

    code = "run_broken"
    retriable = True


@dataclass(slots=True)
class _Item:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    run_id: str | None
    done: asyncio.Future[None]


class Publisher:
    """Every record the worker writes goes through one task, so the events of a request reach Kafka in seq order.

    A failed send breaks its run: the run's later records are refused rather than sent across the gap. After any
    failure the producer is replaced (an idempotent producer whose batches expired is left with sequence numbers
    the broker rejects for good), and ``healthy`` is set again once the new one has started.
    """

    def __init__(
        self,
        make_producer: Callable[[], AIOKafkaProducer],
        topic: str,
        codec: Codec | None = None,
        fence: StallFence | None = None,
    ):
        self._make_producer = make_producer
        self._fence = fence
        self._producer: AIOKafkaProducer | None = None
        self._topic = topic
        self._codec = codec or default_codec()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()
        self._broken_runs: OrderedDict[str, None] = OrderedDict()
        self._replace = False
        self.healthy = asyncio.Event()

    async def start(self) -> None:
        self._producer = await self._started_producer()
        self.healthy.set()
        self._task = asyncio.create_task(self._run(), name="publisher")
        if self._fence is not None:
            self._fence.begin(time.monotonic())
            self._ticker = asyncio.create_task(self._tick(self._fence), name="publisher-stall-fence")

    def publish(self, event: TokenEvent, headers: Headers | None = None) -> asyncio.Future[None]:
        """Queue an event (``headers``: its request's, with the trace context; else the plain ones); the future resolves
        when the broker has acknowledged it (RunBroken once its run broke)."""
        value = self._codec.encode(event)
        run_id = event.run_id or None  # an event of no run (an Accepted) has no run to break
        item = _Item(self._topic, event.request_id.encode(), value, headers or _HEADERS, run_id, self._future())
        return self._put(item)

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
        """Queue any other record (DLQ copies, model announcements) on the same ordered path."""
        return self._put(_Item(topic, key, value, headers, None, self._future()))

    def _future(self) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.add(done)
        done.add_done_callback(self._pending.discard)
        return done

    def _put(self, item: _Item) -> asyncio.Future[None]:
        self._queue.put_nowait(item)
        return item.done

    async def drain(self) -> None:
        """Wait until every record published so far is acknowledged (or failed)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def stop(self, grace_s: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), grace_s)
        for task in (self._task, self._ticker):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), grace_s)

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item.done.done():
                continue
            if item.run_id is not None and item.run_id in self._broken_runs:
                item.done.set_exception(RunBroken(f"run {item.run_id} lost an earlier event"))
                continue
            if item.run_id is not None and not self._settled():
                self._break_run(item, RunBroken("the worker was frozen: its runs wait until its group has settled"))
                self.healthy.clear()
                continue
            if self._replace:
                await self._replace_producer()
            assert self._producer is not None
            try:
                ack = await self._producer.send(item.topic, value=item.value, key=item.key, headers=item.headers)
            except Exception as exc:
                self._failed(item, exc)
                continue
            ack.add_done_callback(lambda f, i=item: self._settle(f, i))

    def _settle(self, ack: asyncio.Future[object], item: _Item) -> None:
        if item.done.done():
            return
        if ack.cancelled():
            self._failed(item, RunBroken("send cancelled"))
        elif (exc := ack.exception()) is not None:
            self._failed(item, exc)
        else:
            item.done.set_result(None)

    def _failed(self, item: _Item, exc: BaseException) -> None:
        log.warning("cannot publish to %s (key %s): %s", item.topic, item.key.decode("utf-8", "replace"), exc)
        self._break_run(item, RunBroken(str(exc) or type(exc).__name__))
        self._replace = True
        self.healthy.clear()

    def _break_run(self, item: _Item, exc: RunBroken) -> None:
        if item.run_id is not None:
            self._broken_runs[item.run_id] = None
            while len(self._broken_runs) > 100_000:
                self._broken_runs.popitem(last=False)
        if not item.done.done():
            item.done.set_exception(exc)

    def _settled(self) -> bool:
        """No freeze is under way or settling (always, without a fence)."""
        return self._fence is None or not self._fence.fenced(time.monotonic())

    async def _tick(self, fence: StallFence) -> None:
        """Tick the stall fence; healthy again once a freeze has settled (and no producer awaits replacement)."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            gap = fence.tick(now)
            if gap is not None:
                log.warning(
                    "the worker was frozen for %.1f s: runs publish nothing for %.1f s, until its group has settled",
                    gap,
                    fence.settle_s,
                )
                self.healthy.clear()
            elif not self.healthy.is_set() and not self._replace and self._settled():
                self.healthy.set()

    async def _replace_producer(self) -> None:
        old, self._producer = self._producer, None
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.stop(), 5.0)
        self._producer = await self._started_producer()
        self._replace = False
        if self._settled():
            self.healthy.set()
        log.info("publisher: producer replaced after a failed send")

    async def _started_producer(self) -> AIOKafkaProducer:
        producer = self._make_producer()
        await start_client(producer, timeout_s=None)
        return producer


@dataclass(slots=True)
class RunStream:
    """Events of one processing attempt: gap-free seq, coalesced Deltas; nothing more once abandoned or broken.

    ``on_broken`` is called once when an event of the run is not acknowledged: the run must stop, and the request
    be taken up again from what the log holds.
    """

    publisher: EventSink
    request_id: str
    run_id: str
    seq: int = 0
    coalescer: DeltaCoalescer = field(default_factory=DeltaCoalescer)
    abandoned: bool = False
    broken: bool = False
    on_broken: Callable[[RunStream], None] | None = None
    last: asyncio.Future[None] | None = None  # acknowledgement of the latest event sent
    sent_ids: list[int] = field(default_factory=list)  # tokens of the Deltas sent, in order
    sent_text: str = ""
    headers: Headers | None = None  # the run's events' Kafka headers when they carry a trace context

    def emit(self, payload: Payload) -> asyncio.Future[None]:
        if self.broken:
            refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            refused.set_exception(RunBroken(f"run {self.run_id} is broken"))
            refused.exception()  # retrieved: the caller learns of it from `broken`
            return refused
        event = TokenEvent(self.request_id, self.run_id, self.seq, int(time.time() * 1000), payload)
        self.seq += 1
        done = self.last = self.publisher.publish(event, self.headers)
        done.add_done_callback(self._watch)
        return done

    def tokens(
        self, token_ids: tuple[int, ...], text: str, index: int = 0, logprobs: tuple[TokenLogprob, ...] = ()
    ) -> None:
        if self.abandoned or self.broken:
            return
        for delta in self.coalescer.add(token_ids, text, index, logprobs):
            self._send_delta(delta)

    def finish(self, payload: Payload) -> asyncio.Future[None]:
        """Send what is pending, then the terminal event; resolves when the terminal event is acknowledged."""
        for delta in self.coalescer.flush():
            self._send_delta(delta)
        return self.emit(payload)

    def hand_over(self) -> asyncio.Future[None] | None:
        """Send the pending tokens and stop here, without a terminal event, for a later run to continue from the
        log; the acknowledgement of the run's last event (None when it sent none)."""
        if not (self.abandoned or self.broken):
            for delta in self.coalescer.flush():
                self._emit_delta(delta)
        self.abandoned = True
        return self.last

    def _send_delta(self, delta: Delta) -> None:
        self._emit_delta(delta).add_done_callback(self._on_ack)

    def _emit_delta(self, delta: Delta) -> asyncio.Future[None]:
        if delta.index == 0:  # what a later run continues from is choice 0's text
            self.sent_ids.extend(delta.token_ids)
            self.sent_text += delta.text
        return self.emit(delta)

    def _watch(self, done: asyncio.Future[None]) -> None:
        if (done.cancelled() or done.exception() is not None) and not self.broken:
            self.broken = True
            if self.on_broken is not None and not self.abandoned:
                self.on_broken(self)

    def _on_ack(self, done: asyncio.Future[None]) -> None:
        if self.abandoned or self.broken or done.cancelled() or done.exception() is not None:
            return
        for delta in self.coalescer.acked():
            self._send_delta(delta)

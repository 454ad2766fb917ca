"""The relay: one read of the events topic serves every subscriber; resume from memory, from Kafka or from the owner.

It composes the parts, each with one job: the hub (subscribers and broadcast), the history (views and recent events
in memory, backfilled from Kafka) and the following (requests another gateway reads, and hand-over when partitions
move). The relay itself reads the partitions it owns and answers subscribe, resume and snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.cursor import Cursor
from gateway.fanout.following import CATCH_UP_S, Following, Upstream
from gateway.fanout.history import Entry, History
from gateway.fanout.hub import Hub
from gateway.fanout.source import EventSource, Record
from gateway.fanout.subscription import Out, Subscription, reset_frame
from gateway.metrics import GatewayMetrics
from schemas.codec import Codec, default_codec
from schemas.errors import CursorError, DecodeError, KafkaUnavailable, NotOwner, UnknownSchemaId
from schemas.partitioning import partition_for_key
from schemas.view import View
from services import tracing
from services.tracing import NO_TRACE, TraceHeaders

log = logging.getLogger(__name__)

# How long a subscription on a following gateway waits for the owner to attach it (then events arrive when it does).
UPSTREAM_ATTACH_S = 5.0


class Tap(Protocol):
    """Sees every record of the owned partitions, before the relay skips those nobody watches (it must be cheap: it
    runs on the relay's read loop), and every change of those partitions."""

    def record(self, record: Record) -> None: ...

    def reassigned(self, gained: set[int], lost: set[int]) -> None: ...


class Relay:
    """Plain asyncio: dispatches each record of the owned partitions by request id to the history and the hub.

    The relay reads only the partitions it owns (``reassign``); a request of another partition is followed from the
    gateway that owns it (``upstream``), with the same memory, resume checks and fan-out.
    """

    def __init__(
        self,
        source: EventSource,
        *,
        memory_events: int = 256,
        memory_total_events: int = 50_000,
        subscriber_buffer: int = 1024,
        max_requests: int = 2048,
        metrics: GatewayMetrics | None = None,
        codec: Codec | None = None,
        backfills: BackfillLimit | None = None,
        upstream: Upstream | None = None,
    ):
        self.source = source
        self.subscriber_buffer = subscriber_buffer
        # Records dispatched between two yields to the event loop: subscribers' writers drain their queues in between,
        # so one large poll cannot overflow a reader that keeps up.
        self.dispatch_slice = max(1, subscriber_buffer // 2)
        self.metrics = metrics or GatewayMetrics()
        self.codec = codec or default_codec()
        self.positions: dict[int, int] = {}  # next offset to read, per owned partition
        self.since_ms: dict[int, int] = {}  # when reading of each owned partition began
        self.hub = Hub(self.metrics)
        self.history = History(
            source,
            self.hub,
            self.codec,
            position=lambda partition: self.positions.get(partition, 0),
            on_forget=lambda entry: self.following.stop(entry),
            memory_events=memory_events,
            memory_total_events=memory_total_events,
            max_requests=max_requests,
            backfills=backfills or BackfillLimit(per_client=2, total=3),
            metrics=self.metrics,
        )
        self.following = Following(source, self.history, self.hub, upstream)
        self.started = asyncio.Event()
        self.tap: Tap | None = None
        self._task: asyncio.Task[None] | None = None
        self._catch_up: list[tuple[int, int, asyncio.Future[None]]] = []  # (partition, offset, until read past it)

    async def start(self) -> None:
        positions, start_time_ms = await self.source.start()
        self.positions.update(positions)
        self.since_ms = {p: start_time_ms for p in self.positions}
        self.metrics.owned_partitions.set(len(self.positions))
        self._task = asyncio.create_task(self._run(), name="relay")
        self.started.set()
        log.info("relay reading %d partitions from %s", len(self.positions), self.positions)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.following.close()
        self.hub.close_all("shutdown")
        await self.source.stop()

    # --- reading the owned partitions ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                records = await self.source.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay poll failed; retrying")
                await asyncio.sleep(1.0)
                continue
            self.metrics.hub_events.inc(len(records))
            for i, record in enumerate(records, 1):
                self.dispatch(record)
                if i % self.dispatch_slice == 0 and i < len(records):
                    await asyncio.sleep(0)
            if self._catch_up:
                self._wake_caught_up()

    def dispatch(self, record: Record) -> None:
        """Take one record of the events topic (synchronous: positions and fan-out move together)."""
        partition = record.partition
        if partition not in self.positions:
            return  # read just before this gateway stopped owning the partition
        self.positions[partition] = record.offset + 1
        if self.tap is not None:
            self.tap.record(record)
        key = record.key
        entry = self.history.by_key(key) if key is not None else None
        if entry is None:
            if key is not None:
                self.history.skip(key)
            return  # nobody watches it: not decoded; a subscriber backfills it from Kafka
        if record.value is None:
            return
        if not entry.trace and tracing.enabled():
            entry.trace = tracing.record_trace(record.headers)
        try:
            ev = self.codec.decode_event(record.value)
        except DecodeError as exc:
            self.metrics.undecodable.inc()
            if not isinstance(exc, UnknownSchemaId):
                log.warning(
                    "request %s: undecodable event at %d/%d: %s", entry.request_id, partition, record.offset, exc
                )
            return
        if not entry.complete:
            if entry.pending is not None:
                entry.pending.append((record.offset, ev))
            return
        self.history.apply(entry, record.offset, ev, live=True)

    def _wake_caught_up(self) -> None:
        waiting = []
        for partition, offset, future in self._catch_up:
            if future.done():
                continue
            if self.positions.get(partition, 0) > offset:
                future.set_result(None)
            else:
                waiting.append((partition, offset, future))
        self._catch_up = waiting

    async def _read_past(self, partition: int, offset: int) -> None:
        """Wait until the relay has read the record at ``offset``; CursorError when the log does not reach that far.

        A cursor beyond this gateway's read position is either from a gateway further ahead (it is reached within
        moments) or forged / from the future (beyond the partition's end): the latter would otherwise wait forever.
        """
        if offset >= await self.source.log_end(partition):
            raise CursorError("cursor is beyond the end of the stream")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._catch_up.append((partition, offset, future))
        self._wake_caught_up()
        try:
            await asyncio.wait_for(future, CATCH_UP_S)
        except TimeoutError:
            raise KafkaUnavailable("the gateway is behind the events topic; try again") from None

    def reassign(self, gained: dict[int, int], lost: set[int], since_ms: int) -> None:
        """The group moved partitions: read the gained ones from ``gained``'s offsets, follow the lost ones."""
        for p in lost:
            self.positions.pop(p, None)
            self.since_ms.pop(p, None)
        for p, offset in gained.items():
            self.positions[p] = offset
            self.since_ms[p] = since_ms
        self.metrics.owned_partitions.set(len(self.positions))
        if self.tap is not None:
            self.tap.reassigned(set(gained), lost)
        self.following.moved(set(gained), lost)

    # --- what handlers ask ----------------------------------------------------------------------------------------

    def owns(self, partition: int) -> bool:
        """Whether this gateway reads the partition (else its requests are followed from the owner)."""
        return partition in self.positions

    def partition_of(self, request_id: str) -> int:
        return partition_for_key(request_id, self.source.partitions)

    def entry(self, request_id: str) -> Entry:
        partition = self.partition_of(request_id)
        return self.history.entry(request_id, partition, self.since_ms.get(partition))

    def trace_of(self, request_id: str) -> TraceHeaders:
        """The request's W3C trace context as its records carry it, when this gateway holds it (tracing on only)."""
        entry = self.history.entries.get(request_id)
        return entry.trace if entry is not None else NO_TRACE

    def subscriber_count(self, request_id: str) -> int:
        """Subscriptions attached to the request now: from then on each gets every live event."""
        return self.hub.count(request_id)

    async def subscribe(
        self, request_id: str, after: Cursor | None, client: str = "", *, forwarded: bool = False
    ) -> Subscription | None:
        """A subscription continuing strictly after ``after``; None when that is at or after the terminal event.

        The subscription is registered in the same step that snapshots memory, so live events and the
        replayed backlog meet with no gap; anything older than memory is read from Kafka and put in front.
        ``forwarded``: another gateway's upstream, which only the owner of the request's partition answers.
        """
        await self.started.wait()
        entry, from_kafka = await self._ready_entry(request_id, after, forwarded, client)
        terminal = entry.terminal
        if after is not None and terminal is not None and after.partition == entry.partition:
            if after.offset > terminal.offset:
                # Nothing of this request is there: a forged or future offset, answered like a malformed cursor.
                raise CursorError("cursor is beyond the end of the stream")
            # At the terminal event only when the cursor names it (its check matches); a forged or stale cursor at
            # that offset falls through to a `reset` instead of a silent 204.
            if after.offset == terminal.offset and after.epoch == terminal.epoch:
                return None
        # A cursor of another partition cannot name an event of this stream: the client starts over (see below),
        # so live events are not filtered by its offset meanwhile.
        after_offset = after.offset if after is not None and after.partition == entry.partition else -1
        sub = Subscription(request_id, after_offset, self.subscriber_buffer, forwarded=forwarded)
        if entry.failure is not None:
            sub.close("failed", entry.failure)
            if self.history.current(entry):
                self.history.forget(entry)
            return sub
        memory = list(entry.outs)
        self.hub.attach(sub)
        if entry.followed:
            self.following.follow(entry)  # a subscriber that left meanwhile may have stopped the upstream
        position = self._position(entry)
        first_in_memory = memory[0].offset if memory else position
        history = memory
        if entry.trimmed and after_offset < first_in_memory:
            from_kafka = True
            history = await self._with_prefix(entry, sub, memory, first_in_memory)
        self.metrics.replays.labels("kafka" if from_kafka else "memory").inc()
        if after is None:
            sub.backlog = history
            return sub
        reason = ""
        if after.partition != entry.partition:
            reason = "cursor_not_in_this_stream"
        elif after.offset < position:
            # The relay has read past the cursor, so the cursor must name one of this request's events.
            match = next((o for o in history if o.offset == after.offset), None)
            if match is None or match.epoch != after.epoch:
                log_start = await self.source.log_start(entry.partition)
                reason = "retention" if after.offset < log_start else "unknown_cursor"
                log.info("request %s: cursor %s does not resume (%s)", request_id, after, reason)
        if reason:
            # A reset restarts the client from the stream's first event: the whole history, not memory's tail.
            if entry.trimmed and history is memory:
                history = await self._with_prefix(entry, sub, memory, first_in_memory)
            sub.preamble.append(reset_frame(reason))
            sub.backlog, sub.after_offset = history, -1
            return sub
        sub.backlog = [o for o in history if o.offset > after_offset]
        return sub

    async def _ready_entry(
        self, request_id: str, after: Cursor | None, forwarded: bool, client: str
    ) -> tuple[Entry, bool]:
        """The request's entry with its history in place: backfilled when owned, followed from the owner if not,
        and read up to ``after`` (a cursor another gateway, further ahead, handed out).

        True with it when its history came from Kafka now.
        """
        while True:
            entry = self.entry(request_id)
            if self.owns(entry.partition):
                from_kafka = await self.history.ensure_complete(entry, client)
                if (
                    after is not None
                    and after.partition == entry.partition
                    and entry.terminal is None
                    and after.offset >= self.positions.get(entry.partition, 0)
                ):
                    await self._read_past(entry.partition, after.offset)
                if self.history.current(entry) and self.owns(entry.partition):
                    return entry, from_kafka
                continue  # the partition moved while the history was read: start again on the new footing
            if forwarded:
                raise NotOwner(f"this gateway does not read the partition of request {request_id}")
            self.following.follow(entry)
            if not entry.outs:
                await self.following.attached(entry, UPSTREAM_ATTACH_S)
            if after is not None and after.partition == entry.partition:
                await self.following.reach(entry, after.offset)
            if self.history.current(entry):
                return entry, False

    def _position(self, entry: Entry) -> int:
        """How far this gateway knows the request's stream: offsets below it that are not its events never will be."""
        if entry.followed:
            return self.following.position(entry)
        return self.positions.get(entry.partition, 0)

    async def _with_prefix(self, entry: Entry, sub: Subscription, memory: list[Out], first_in_memory: int) -> list[Out]:
        """The events older than memory, read from Kafka, followed by memory."""
        try:
            return await self.history.older_than_memory(entry, first_in_memory) + memory
        except BaseException:
            self.hub.detach(sub)
            raise

    def unsubscribe(self, sub: Subscription) -> None:
        sub.on_slow = None
        self.hub.detach(sub)
        entry = self.history.entries.get(sub.request_id)
        if entry is not None and not self.hub.watched(sub.request_id):
            self.history.unwatched(entry)
            if entry.terminal is None:
                self.following.stop(entry)  # kept in memory; a new subscriber resumes it after its last event

    async def snapshot(self, request_id: str, client: str = "") -> View:
        """The request's view as of now (backfilled from Kafka when needed, on ``client``'s share; read from Kafka
        when another gateway owns its partition)."""
        await self.started.wait()
        partition = self.partition_of(request_id)
        if not self.owns(partition):
            async with self.history.backfills.turn(client):
                return await self.history.read_view(request_id, partition)
        entry = self.entry(request_id)
        await self.history.ensure_complete(entry, client)
        return entry.view

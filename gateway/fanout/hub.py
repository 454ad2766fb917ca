"""Fan-out hub: one read of the events topic serves every subscriber; replay from memory or from Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.cursor import Cursor, encode_cursor, event_epoch
from gateway.fanout.sse import frame
from gateway.metrics import GatewayMetrics
from schemas.codec import Codec, default_codec
from schemas.errors import CursorError, DecodeError, KafkaUnavailable, NotOwner, ValidationError
from schemas.ids import CLOCK_SKEW_MS, request_id_time_ms
from schemas.partitioning import partition_for_key
from schemas.records import TokenEvent
from schemas.view import EventName, View, ViewEvent

log = logging.getLogger(__name__)

# How long a resume waits for this gateway to read up to a cursor that another (further ahead) gateway handed out, or
# for the owner's stream of a followed request to reach it.
CATCH_UP_S = 10.0
# How long a subscription on a following gateway waits for the owner to attach it (then events arrive when it does).
UPSTREAM_ATTACH_S = 5.0


@dataclass(frozen=True, slots=True)
class SourceRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


class Record(Protocol):
    """One record of the events topic as the hub reads it (a SourceRecord, or aiokafka's ConsumerRecord as is)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class EventSource(Protocol):
    """Where the hub reads token events: the Kafka events topic, or a list in unit tests."""

    partitions: int

    async def start(self) -> tuple[dict[int, int], int]:
        """Start reading; returns the next offset per partition and the broker time reading started at."""
        ...

    async def poll(self) -> Sequence[Record]:
        """Next records in offset order per partition; waits a little when there are none."""
        ...

    async def replay(self, partition: int, from_time_ms: int, stop_offset: int, key: bytes) -> list[SourceRecord]:
        """Records with this key from the first with timestamp >= from_time_ms up to stop_offset (excluded)."""
        ...

    async def log_start(self, partition: int) -> int:
        """Oldest offset still retained in the partition."""
        ...

    async def log_end(self, partition: int) -> int:
        """Offset the next record written to the partition will get."""
        ...

    async def stop(self) -> None: ...


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

    def close(self, reason: str) -> None:
        self.closed = reason
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


@dataclass(slots=True)
class Entry:
    """What the hub knows about one request."""

    request_id: str
    partition: int
    complete: bool
    view: View
    outs: deque[Out]
    trimmed: bool = False
    subscribers: set[Subscription] = field(default_factory=set)
    backfill: asyncio.Task[None] | None = None
    pending: list[tuple[int, TokenEvent]] | None = None
    followed: bool = False  # fed by the owning gateway's stream (gateway.cluster.upstream), not by this gateway's read
    last_out: Out | None = None
    terminal: Out | None = None
    progress: asyncio.Event | None = None  # set (and dropped) at the next event; created by whoever waits


class Upstream(Protocol):
    """Follows requests whose partition another gateway reads (gateway.cluster.upstream.Follower)."""

    def follow(self, entry: Entry) -> None:
        """Make sure the entry is fed from its owner, resuming after ``entry.last_out``."""
        ...

    def stop(self, entry: Entry) -> None: ...

    async def attached(self, entry: Entry, timeout_s: float) -> None:
        """Returns once the owner answered the entry's stream (or after ``timeout_s``)."""
        ...


class Hub:
    """Plain asyncio fan-out: dispatches each record of the events topic by request id to bounded queues.

    Memory: each request keeps at most ``memory_events`` recent events, and all requests together at most
    ``memory_total_events`` (and ``max_requests`` entries). Over either limit the hub forgets the least recently used
    finished requests first, then unfinished ones nobody watches, and only then trims the oldest events of watched
    ones. Forgetting never changes what a client sees: a forgotten request or event is replayed from Kafka.

    Only requests someone watches (or watched recently) are tracked: the records of any other key are skipped by
    their key bytes, undecoded, and such a request is backfilled from Kafka when someone asks for it. The hub reads
    only the partitions it owns (``reassign``); a request of another partition is followed from the gateway that
    owns it (``upstream``), with the same memory, resume checks and fan-out.
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
        self.upstream = upstream
        self.memory_events = memory_events
        self.memory_total_events = memory_total_events
        self.subscriber_buffer = subscriber_buffer
        self.max_requests = max_requests
        # Records dispatched between two yields to the event loop: subscribers' writers drain their queues in between,
        # so one large poll cannot overflow a reader that keeps up.
        self.dispatch_slice = max(1, subscriber_buffer // 2)
        self.memory_count = 0  # events held in all entries' `outs`
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished requests, least recently used first
        self._vouch_floor_ms = -1  # requests created at or before this may have been forgotten: backfill them
        self.metrics = metrics or GatewayMetrics()
        self.codec = codec or default_codec()
        self.positions: dict[int, int] = {}  # next offset to read, per owned partition
        self.since_ms: dict[int, int] = {}  # when reading of each owned partition began
        self.start_time_ms = 0
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self._keys: dict[bytes, Entry] = {}  # the same entries by key bytes: dispatch never decodes a key
        # Keys whose records went by undecoded: the hub cannot vouch for them (bounded; older ones raise the floor).
        self._skipped: dict[bytes, None] = {}
        self.max_skipped = 16 * max_requests
        self._tasks: set[asyncio.Task[None]] = set()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.started = asyncio.Event()
        self._catch_up: list[tuple[int, int, asyncio.Future[None]]] = []  # (partition, offset, until read past it)
        self.backfills = backfills or BackfillLimit(per_client=2, total=3)

    async def start(self) -> None:
        self.positions, self.start_time_ms = await self.source.start()
        self.since_ms = {p: self.start_time_ms for p in self.positions}
        self.metrics.owned_partitions.set(len(self.positions))
        self._task = asyncio.create_task(self._run(), name="hub")
        self.started.set()
        log.info("hub reading %d partitions from %s", len(self.positions), self.positions)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for entry in self.entries.values():
            if entry.followed and self.upstream is not None:
                self.upstream.stop(entry)
            for sub in list(entry.subscribers):
                sub.close("shutdown")
        for task in list(self._tasks):
            task.cancel()
        await self.source.stop()

    async def _run(self) -> None:
        while True:
            try:
                records = await self.source.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("hub poll failed; retrying")
                await asyncio.sleep(1.0)
                continue
            self.metrics.hub_events.inc(len(records))
            for i, record in enumerate(records, 1):
                self.dispatch(record)
                if i % self.dispatch_slice == 0 and i < len(records):
                    await asyncio.sleep(0)
            if self._catch_up:
                self._wake_caught_up()

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
        """Wait until the hub has read the record at ``offset``; CursorError when the log does not reach that far.

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

    def dispatch(self, record: Record) -> None:
        """Take one record of the events topic (synchronous: positions and fan-out move together)."""
        partition = record.partition
        if partition not in self.positions:
            return  # read just before this gateway stopped owning the partition
        self.positions[partition] = record.offset + 1
        key = record.key
        entry = self._keys.get(key) if key is not None else None
        if entry is None:
            if key is not None and key not in self._skipped:
                self._skip(key)
            return  # nobody watches it: not decoded; a subscriber backfills it from Kafka
        if record.value is None:
            return
        try:
            ev = self.codec.decode_event(record.value)
        except DecodeError as exc:
            self.metrics.undecodable.inc()
            log.warning("request %s: undecodable event at %d/%d: %s", entry.request_id, partition, record.offset, exc)
            return
        if not entry.complete:
            if entry.pending is not None:
                entry.pending.append((record.offset, ev))
            return
        self._apply(entry, record.offset, ev, live=True)

    def _skip(self, key: bytes) -> None:
        self._skipped[key] = None
        if len(self._skipped) > self.max_skipped:
            oldest = next(iter(self._skipped))
            del self._skipped[oldest]
            with contextlib.suppress(ValidationError, UnicodeDecodeError):
                self._vouch_floor_ms = max(self._vouch_floor_ms, request_id_time_ms(oldest.decode()))

    def _apply(self, entry: Entry, offset: int, ev: TokenEvent, *, live: bool) -> None:
        had_token = entry.view.first_token_ts_ms is not None
        view_event = entry.view.feed(offset, ev)
        if view_event is None:
            return
        if live and not had_token and view_event.event == EventName.TOKEN:
            with contextlib.suppress(ValidationError):
                self.metrics.ttft.observe(max(0.0, time.time() - request_id_time_ms(entry.request_id) / 1000))
        self._publish(entry, make_out(entry.partition, entry.request_id, view_event))

    def feed(self, entry: Entry, out: Out) -> None:
        """An event of a followed request, as its owner sent it (cursor and framing unchanged)."""
        if not entry.followed or self.entries.get(entry.request_id) is not entry:
            return
        if entry.last_out is not None and out.offset <= entry.last_out.offset:
            return  # already had it (a reconnect that overlapped)
        self._publish(entry, out)

    def _publish(self, entry: Entry, out: Out) -> None:
        """Remember one view event and offer it to every subscriber."""
        if len(entry.outs) == entry.outs.maxlen:
            entry.trimmed = True
        else:
            self.memory_count += 1
        entry.outs.append(out)
        entry.last_out = out
        if out.event.terminal:
            entry.terminal = out
            self._finished[entry.request_id] = None
            self._finished.move_to_end(entry.request_id)
        if entry.progress is not None:
            entry.progress.set()
            entry.progress = None
        for sub in list(entry.subscribers):
            if not sub.offer(out):
                self._detach(entry, sub)
                sub.close("slow")
                self.metrics.slow_disconnects.inc()
                log.info("request %s: slow subscriber disconnected", entry.request_id)
        if self.memory_count > self.memory_total_events:
            self._shrink(entry)

    def _complete_from_start(self, request_id: str, partition: int) -> bool:
        """Whether every record of the request went through this hub's read (so memory alone has its history)."""
        since = self.since_ms.get(partition)
        if since is None or request_id in self._evicted or request_id.encode() in self._skipped:
            return False
        try:
            created = request_id_time_ms(request_id)
        except ValidationError:
            return False
        return created - CLOCK_SKEW_MS >= since and created > self._vouch_floor_ms

    def owns(self, partition: int) -> bool:
        """Whether this gateway reads the partition (else its requests are followed from the owner)."""
        return partition in self.positions

    def partition_of(self, request_id: str) -> int:
        return partition_for_key(request_id, self.source.partitions)

    def _new_entry(self, request_id: str) -> Entry:
        partition = self.partition_of(request_id)
        complete = self._complete_from_start(request_id, partition)
        entry = Entry(request_id, partition, complete, View(request_id), deque(maxlen=self.memory_events))
        self.entries[request_id] = entry
        self._keys[request_id.encode()] = entry
        if len(self.entries) > self.max_requests:
            self._shrink(entry)
        return entry

    def _over(self, events_low: int, entries_low: int) -> bool:
        return self.memory_count > events_low or len(self.entries) > entries_low

    def _shrink(self, keep: Entry) -> None:
        """Back under the memory limits, with some slack so this runs once per many events, not per event.

        Least recently used finished requests go first, then unwatched unfinished ones; watched requests only lose
        their oldest events (their subscribers hold their own queues; older cursors replay from Kafka).
        """
        events_low = self.memory_total_events - self.memory_total_events // 8
        entries_low = self.max_requests - self.max_requests // 16
        while self._finished and self._over(events_low, entries_low):
            request_id, _ = self._finished.popitem(last=False)
            entry = self.entries.get(request_id)
            if entry is not None and entry is not keep and not entry.subscribers and entry.backfill is None:
                self._forget(entry)
            # A finished entry with subscribers rejoins the list when its last subscriber leaves.
        if not self._over(events_low, entries_low):
            return
        for entry in list(self.entries.values()):
            if entry is not keep and not entry.subscribers and entry.backfill is None:
                self._forget(entry)
                if not self._over(events_low, entries_low):
                    return
        for entry in list(self.entries.values()):
            if self.memory_count <= events_low:
                return
            drop = min(len(entry.outs), self.memory_count - events_low)
            if drop:
                entry.trimmed = True
                self.memory_count -= drop
                for _ in range(drop):
                    entry.outs.popleft()

    def _forget(self, entry: Entry) -> None:
        """Drop a request from memory; from now on it is backfilled from Kafka when someone asks for it."""
        del self.entries[entry.request_id]
        self._keys.pop(entry.request_id.encode(), None)
        if entry.followed and self.upstream is not None:
            self.upstream.stop(entry)
        self._finished.pop(entry.request_id, None)
        self.memory_count -= len(entry.outs)
        self._evicted[entry.request_id] = None
        while len(self._evicted) > 16 * self.max_requests:
            old, _ = self._evicted.popitem(last=False)
            with contextlib.suppress(ValidationError):
                self._vouch_floor_ms = max(self._vouch_floor_ms, request_id_time_ms(old))

    def entry(self, request_id: str) -> Entry:
        entry = self.entries.get(request_id)
        if entry is None:
            entry = self._new_entry(request_id)
        else:
            self.entries.move_to_end(request_id)
            if request_id in self._finished:
                self._finished.move_to_end(request_id)
        return entry

    async def ensure_complete(self, entry: Entry, client: str = "") -> bool:
        """Backfill a request's history from Kafka once; True when that happened now.

        A new backfill waits for ``client``'s turn (see BackfillLimit); joining one in flight costs nothing.
        """
        if entry.complete:
            return False
        if entry.backfill is None:
            entry.backfill = asyncio.create_task(self._bounded_backfill(entry, client))
        try:
            await asyncio.shield(entry.backfill)
        finally:
            if entry.backfill is not None and entry.backfill.done():
                entry.backfill = None
        return True

    async def _bounded_backfill(self, entry: Entry, client: str) -> None:
        async with self.backfills.turn(client):
            await self._backfill(entry)

    async def _backfill(self, entry: Entry) -> None:
        stop = self.positions.get(entry.partition, 0)  # 0: the partition just moved away; the caller retries
        entry.pending = []
        try:
            records = await self.source.replay(
                entry.partition, self._start_time(entry.request_id), stop, entry.request_id.encode()
            )
            view = View(entry.request_id)
            entry.view = view
            self.memory_count -= len(entry.outs)
            entry.outs.clear()
            entry.last_out = entry.terminal = None
            entry.trimmed = False
            for record in records:
                with contextlib.suppress(DecodeError):
                    self._apply(entry, record.offset, self.codec.decode_event(record.value), live=False)
            for offset, ev in entry.pending:
                self._apply(entry, offset, ev, live=False)
            entry.complete = True
        finally:
            entry.pending = None

    def _start_time(self, request_id: str) -> int:
        return max(0, request_id_time_ms(request_id) - CLOCK_SKEW_MS)

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
        memory = list(entry.outs)
        self._attach(entry, sub)
        if entry.followed:
            self._follow(entry)  # a subscriber that left meanwhile may have stopped the upstream
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
            # The hub has read past the cursor, so the cursor must name one of this request's events.
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
                from_kafka = await self.ensure_complete(entry, client)
                if (
                    after is not None
                    and after.partition == entry.partition
                    and entry.terminal is None
                    and after.offset >= self.positions.get(entry.partition, 0)
                ):
                    await self._read_past(entry.partition, after.offset)
                if self.entries.get(request_id) is entry and self.owns(entry.partition):
                    return entry, from_kafka
                continue  # the partition moved while the history was read: start again on the new footing
            if forwarded:
                raise NotOwner(f"this gateway does not read the partition of request {request_id}")
            self._follow(entry)
            assert self.upstream is not None
            if not entry.outs:
                await self.upstream.attached(entry, UPSTREAM_ATTACH_S)
            if after is not None and after.partition == entry.partition:
                await self._reach(entry, after.offset)
            if self.entries.get(request_id) is entry:
                return entry, False

    def _follow(self, entry: Entry) -> None:
        if self.upstream is None:
            raise NotOwner(f"no gateway to follow request {entry.request_id} from")
        entry.followed = entry.complete = True
        self.upstream.follow(entry)

    def _position(self, entry: Entry) -> int:
        """How far this gateway knows the request's stream: offsets below it that are not its events never will be."""
        if entry.followed:
            return entry.last_out.offset + 1 if entry.last_out is not None else 0
        return self.positions.get(entry.partition, 0)

    async def _reach(self, entry: Entry, offset: int) -> None:
        """Wait until a followed stream has come past ``offset`` (what ``_read_past`` is for a partition read here)."""
        if entry.terminal is not None or self._position(entry) > offset:
            return
        if offset >= await self.source.log_end(entry.partition):
            raise CursorError("cursor is beyond the end of the stream")
        deadline = asyncio.get_running_loop().time() + CATCH_UP_S
        while entry.terminal is None and self._position(entry) <= offset and entry.followed:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise KafkaUnavailable(f"request {entry.request_id}: the gateway that reads its partition is behind")
            if entry.progress is None:
                entry.progress = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.progress.wait(), remaining)

    def reassign(self, gained: dict[int, int], lost: set[int], since_ms: int) -> None:
        """The group moved partitions: read the gained ones from ``gained``'s offsets, follow the lost ones.

        Watched requests change feed without their subscribers noticing: a followed one gets the rest of its history
        from Kafka from where its last event was, an owned one resumes from the new owner after its last event.
        Another gateway's upstream is ended instead, so that gateway goes to the new owner itself.
        """
        for p in lost:
            self.positions.pop(p, None)
            self.since_ms.pop(p, None)
        for p, offset in gained.items():
            self.positions[p] = offset
            self.since_ms[p] = since_ms
        self.metrics.owned_partitions.set(len(self.positions))
        for entry in list(self.entries.values()):
            if entry.partition in lost and not entry.followed:
                for sub in list(entry.subscribers):
                    if sub.forwarded:
                        self._detach(entry, sub)
                        sub.close("moved")
                if entry.subscribers and entry.complete and entry.backfill is None:
                    self._follow(entry)
                else:
                    self._drop(entry)
            elif entry.partition in gained and entry.followed:
                assert self.upstream is not None
                self.upstream.stop(entry)
                entry.followed = False
                if not entry.subscribers:
                    self._drop(entry)
                    continue
                seen = entry.last_out.offset if entry.last_out is not None else -1
                for sub in entry.subscribers:
                    sub.after_offset = max(sub.after_offset, seen)  # the backfill offers them only what is new
                entry.complete = False
                task = asyncio.create_task(self._take_over(entry))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _take_over(self, entry: Entry) -> None:
        try:
            await self.ensure_complete(entry)
        except Exception as exc:
            log.warning("request %s: taking over its stream failed (%s); its subscribers resume", entry.request_id, exc)
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        """Forget an entry now, ending its subscriptions (their clients resume with their cursors)."""
        for sub in list(entry.subscribers):
            self._detach(entry, sub)
            sub.close("moved")
        if self.entries.get(entry.request_id) is entry:
            self._forget(entry)

    def upstream_reset(self, entry: Entry, reason: str) -> None:
        """The owner could not continue a followed stream after its last event (topic recreated, retention)."""
        log.warning("request %s: the owner cannot continue its stream (%s)", entry.request_id, reason)
        self._drop(entry)

    async def _with_prefix(self, entry: Entry, sub: Subscription, memory: list[Out], first_in_memory: int) -> list[Out]:
        """The events older than memory, read from Kafka, followed by memory."""
        request_id = entry.request_id
        try:
            records = await self.source.replay(
                entry.partition, self._start_time(request_id), first_in_memory, request_id.encode()
            )
        except BaseException:
            self._detach(entry, sub)
            raise
        view = View(request_id)
        prefix = []
        for record in records:
            with contextlib.suppress(DecodeError):
                if (ev := view.feed(record.offset, self.codec.decode_event(record.value))) is not None:
                    prefix.append(make_out(entry.partition, request_id, ev))
        return prefix + memory

    def unsubscribe(self, sub: Subscription) -> None:
        sub.on_slow = None
        entry = self.entries.get(sub.request_id)
        if entry is not None:
            self._detach(entry, sub)
            if not entry.subscribers and entry.terminal is not None:
                self._finished[sub.request_id] = None
                self._finished.move_to_end(sub.request_id)
            elif not entry.subscribers and entry.followed and self.upstream is not None:
                self.upstream.stop(entry)  # kept in memory; a new subscriber resumes it after its last event

    def _attach(self, entry: Entry, sub: Subscription) -> None:
        entry.subscribers.add(sub)
        self.metrics.subscribers.inc()

    def _detach(self, entry: Entry, sub: Subscription) -> None:
        if sub in entry.subscribers:
            entry.subscribers.remove(sub)
            self.metrics.subscribers.dec()

    def subscriber_count(self, request_id: str) -> int:
        """Subscriptions attached to the request now: from then on each gets every live event."""
        entry = self.entries.get(request_id)
        return len(entry.subscribers) if entry is not None else 0

    async def snapshot(self, request_id: str, client: str = "") -> View:
        """The request's view as of now (backfilled from Kafka when needed, on ``client``'s share; read from Kafka
        when another gateway owns its partition)."""
        await self.started.wait()
        partition = self.partition_of(request_id)
        if not self.owns(partition):
            async with self.backfills.turn(client):
                return await self._read_view(request_id, partition)
        entry = self.entry(request_id)
        await self.ensure_complete(entry, client)
        return entry.view

    async def _read_view(self, request_id: str, partition: int) -> View:
        """A request's view straight from its partition in Kafka (any gateway can read any partition)."""
        stop = await self.source.log_end(partition)
        records = await self.source.replay(partition, self._start_time(request_id), stop, request_id.encode())
        view = View(request_id)
        for record in records:
            with contextlib.suppress(DecodeError):
                view.feed(record.offset, self.codec.decode_event(record.value))
        return view

"""What the relay remembers of each request: its view and recent events within memory bounds, backfilled from Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.hub import Hub
from gateway.fanout.source import EventSource
from gateway.fanout.subscription import Out, make_out
from gateway.metrics import GatewayMetrics
from schemas.codec import Codec
from schemas.errors import DecodeError, ValidationError
from schemas.ids import CLOCK_SKEW_MS, request_id_time_ms
from schemas.records import TokenEvent
from schemas.view import EventName, View
from services import tracing
from services.tracing import NO_TRACE, TraceHeaders

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    """What the relay knows about one request."""

    request_id: str
    partition: int
    complete: bool
    view: View
    outs: deque[Out]
    trimmed: bool = False
    backfill: asyncio.Task[None] | None = None
    pending: list[tuple[int, TokenEvent]] | None = None
    followed: bool = False  # fed by the owning gateway's stream (gateway.cluster.upstream), not by this gateway's read
    last_out: Out | None = None
    terminal: Out | None = None
    progress: asyncio.Event | None = None  # set (and dropped) at the next event; created by whoever waits
    failure: dict[str, str] | None = None  # a followed stream its owner would not (or could not prove to) give
    trace: TraceHeaders = NO_TRACE  # the request's W3C trace context, from its records' headers (tracing on only)


class History:
    """The requests the relay holds, each with its view and recent events; new events are broadcast by the hub.

    Memory: each request keeps at most ``memory_events`` recent events, and all requests together at most
    ``memory_total_events`` (and ``max_requests`` entries). Over either limit the least recently used finished
    requests are forgotten first, then unfinished ones nobody watches, and only then watched ones lose their oldest
    events. Forgetting never changes what a client sees: a forgotten request or event is replayed from Kafka.

    Only requests someone watches (or watched recently) are held: the records of any other key go by undecoded
    (``skip``), and such a request is backfilled from Kafka when someone asks for it. ``position`` says how far the
    relay has read a partition it owns; ``on_forget`` is told of every entry dropped from memory.
    """

    def __init__(
        self,
        source: EventSource,
        hub: Hub,
        codec: Codec,
        *,
        position: Callable[[int], int],
        on_forget: Callable[[Entry], None],
        memory_events: int,
        memory_total_events: int,
        max_requests: int,
        backfills: BackfillLimit,
        metrics: GatewayMetrics,
    ):
        self.source = source
        self.hub = hub
        self.codec = codec
        self.position = position
        self.on_forget = on_forget
        self.memory_events = memory_events
        self.memory_total_events = memory_total_events
        self.max_requests = max_requests
        self.backfills = backfills
        self.metrics = metrics
        self.memory_count = 0  # events held in all entries' `outs`
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self._keys: dict[bytes, Entry] = {}  # the same entries by key bytes: dispatch never decodes a key
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished requests, least recently used first
        self._vouch_floor_ms = -1  # requests created at or before this may have been forgotten: backfill them
        # Keys whose records went by undecoded: memory cannot vouch for them (bounded; older ones raise the floor).
        self._skipped: dict[bytes, None] = {}
        self.max_skipped = 16 * max_requests
        self._evicted: OrderedDict[str, None] = OrderedDict()

    # --- the entries and their memory ---------------------------------------------------------------------------

    def by_key(self, key: bytes) -> Entry | None:
        return self._keys.get(key)

    def skip(self, key: bytes) -> None:
        """A record of an unheld request went by undecoded."""
        if key in self._skipped:
            return
        self._skipped[key] = None
        if len(self._skipped) > self.max_skipped:
            oldest = next(iter(self._skipped))
            del self._skipped[oldest]
            with contextlib.suppress(ValidationError, UnicodeDecodeError):
                self._vouch_floor_ms = max(self._vouch_floor_ms, request_id_time_ms(oldest.decode()))

    def entry(self, request_id: str, partition: int, since_ms: int | None) -> Entry:
        """The request's entry (made when new); ``since_ms``: since when this relay reads the partition, if it does."""
        entry = self.entries.get(request_id)
        if entry is None:
            return self._new_entry(request_id, partition, since_ms)
        self.entries.move_to_end(request_id)
        if request_id in self._finished:
            self._finished.move_to_end(request_id)
        return entry

    def _new_entry(self, request_id: str, partition: int, since_ms: int | None) -> Entry:
        complete = self._complete_from_start(request_id, since_ms)
        entry = Entry(request_id, partition, complete, View(request_id), deque(maxlen=self.memory_events))
        self.entries[request_id] = entry
        self._keys[request_id.encode()] = entry
        if len(self.entries) > self.max_requests:
            self._shrink(entry)
        return entry

    def _complete_from_start(self, request_id: str, since_ms: int | None) -> bool:
        """Whether every record of the request went through this relay's read (so memory alone has its history)."""
        if since_ms is None or request_id in self._evicted or request_id.encode() in self._skipped:
            return False
        try:
            created = request_id_time_ms(request_id)
        except ValidationError:
            return False
        return created - CLOCK_SKEW_MS >= since_ms and created > self._vouch_floor_ms

    def current(self, entry: Entry) -> bool:
        """Whether ``entry`` is still the one held for its request (not forgotten, nor forgotten and made again)."""
        return self.entries.get(entry.request_id) is entry

    def unwatched(self, entry: Entry) -> None:
        """Its last subscriber left: a finished request joins the ones forgotten first."""
        if entry.terminal is not None:
            self._finished[entry.request_id] = None
            self._finished.move_to_end(entry.request_id)

    def _over(self, events_low: int, entries_low: int) -> bool:
        return self.memory_count > events_low or len(self.entries) > entries_low

    def _forgettable(self, entry: Entry, keep: Entry) -> bool:
        return entry is not keep and entry.backfill is None and not self.hub.watched(entry.request_id)

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
            if entry is not None and self._forgettable(entry, keep):
                self.forget(entry)
            # A finished entry with subscribers rejoins the list when its last subscriber leaves.
        if not self._over(events_low, entries_low):
            return
        for entry in list(self.entries.values()):
            if self._forgettable(entry, keep):
                self.forget(entry)
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

    def forget(self, entry: Entry) -> None:
        """Drop a request from memory; from now on it is backfilled from Kafka when someone asks for it."""
        del self.entries[entry.request_id]
        self._keys.pop(entry.request_id.encode(), None)
        self.on_forget(entry)
        self._finished.pop(entry.request_id, None)
        self.memory_count -= len(entry.outs)
        self._evicted[entry.request_id] = None
        while len(self._evicted) > 16 * self.max_requests:
            old, _ = self._evicted.popitem(last=False)
            with contextlib.suppress(ValidationError):
                self._vouch_floor_ms = max(self._vouch_floor_ms, request_id_time_ms(old))

    # --- new events ---------------------------------------------------------------------------------------------

    def apply(self, entry: Entry, offset: int, ev: TokenEvent, *, live: bool) -> None:
        """Fold one record of the request into its view, and publish the view event it makes (if any)."""
        had_token = entry.view.first_token_ts_ms is not None
        view_event = entry.view.feed(offset, ev)
        if view_event is None:
            return
        if live and not had_token and view_event.event == EventName.TOKEN:
            with contextlib.suppress(ValidationError):
                self.metrics.ttft.observe(max(0.0, time.time() - request_id_time_ms(entry.request_id) / 1000))
        self.publish(entry, make_out(entry.partition, entry.request_id, view_event))

    def publish(self, entry: Entry, out: Out) -> None:
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
        self.hub.publish(entry.request_id, out)
        if self.memory_count > self.memory_total_events:
            self._shrink(entry)

    # --- backfill from Kafka ------------------------------------------------------------------------------------

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
        # Records before `stop` are replayed; from it on, the relay's read hands them over (`pending`) meanwhile.
        stop = self.position(entry.partition)  # 0: the partition just moved away; the caller retries
        entry.pending = []
        try:
            replayed = await self._replay(entry.partition, entry.request_id, stop, entry)
            entry.view = View(entry.request_id)
            self.memory_count -= len(entry.outs)
            entry.outs.clear()
            entry.last_out = entry.terminal = None
            entry.trimmed = False
            for offset, ev in replayed + entry.pending:
                self.apply(entry, offset, ev, live=False)
            entry.complete = True
        finally:
            entry.pending = None

    async def older_than_memory(self, entry: Entry, first_in_memory: int) -> list[Out]:
        """The request's events before ``first_in_memory``, read from Kafka."""
        view = View(entry.request_id)
        prefix = []
        for offset, ev in await self._replay(entry.partition, entry.request_id, first_in_memory, entry):
            if (view_event := view.feed(offset, ev)) is not None:
                prefix.append(make_out(entry.partition, entry.request_id, view_event))
        return prefix

    async def read_view(self, request_id: str, partition: int) -> View:
        """A request's view straight from its partition in Kafka (any gateway can read any partition)."""
        view = View(request_id)
        for offset, ev in await self._replay(partition, request_id, await self.source.log_end(partition)):
            view.feed(offset, ev)
        return view

    async def _replay(
        self, partition: int, request_id: str, stop: int, entry: Entry | None = None
    ) -> list[tuple[int, TokenEvent]]:
        """The request's decodable events in ``partition`` before offset ``stop``, read from Kafka (and the trace
        context they carry into ``entry``)."""
        records = await self.source.replay(partition, start_time(request_id), stop, request_id.encode())
        events = []
        for record in records:
            if entry is not None and not entry.trace and tracing.enabled():
                entry.trace = tracing.record_trace(record.headers)
            with contextlib.suppress(DecodeError):
                events.append((record.offset, self.codec.decode_event(record.value)))
        return events


def start_time(request_id: str) -> int:
    """Where a replay of the request starts: its id's time, less the clock skew allowed between hosts."""
    return max(0, request_id_time_ms(request_id) - CLOCK_SKEW_MS)

"""Ownership and hand-over: a request of a partition another gateway reads is followed from that owner's stream, and
watched requests change feed when the group moves partitions, without their subscribers noticing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from gateway.fanout.history import Entry, History
from gateway.fanout.hub import Hub
from gateway.fanout.source import EventSource
from gateway.fanout.subscription import Out
from schemas.errors import CursorError, KafkaUnavailable, NotOwner

log = logging.getLogger(__name__)

# How long a resume waits for this gateway's read, or the owner's stream of a followed request, to reach a cursor that
# another (further ahead) gateway handed out.
CATCH_UP_S = 10.0


class Sink(Protocol):
    """Where an upstream hands the events of a followed request."""

    def feed(self, entry: Entry, out: Out) -> None:
        """An event of the request, as its owner sent it (cursor and framing unchanged)."""
        ...

    def reset(self, entry: Entry, reason: str) -> None:
        """The owner cannot continue the stream after the entry's last event (topic recreated, retention)."""
        ...

    def fail(self, entry: Entry, code: str, message: str) -> None:
        """The stream cannot be followed at all (the owner refuses, or is not a gateway of this cluster)."""
        ...


class Upstream(Protocol):
    """Follows requests whose partition another gateway reads (gateway.cluster.upstream.Follower)."""

    def follow(self, entry: Entry, sink: Sink) -> None:
        """Make sure the entry is fed to ``sink`` from its owner, resuming after ``entry.last_out``."""
        ...

    def stop(self, entry: Entry) -> None: ...

    async def attached(self, entry: Entry, timeout_s: float) -> None:
        """Returns once the owner answered the entry's stream (or after ``timeout_s``)."""
        ...


class Following:
    """The followed requests of one relay, fed by ``upstream``; the Sink of each of their streams."""

    def __init__(self, source: EventSource, history: History, hub: Hub, upstream: Upstream | None):
        self.source = source
        self.history = history
        self.hub = hub
        self.upstream = upstream
        self._tasks: set[asyncio.Task[None]] = set()

    def follow(self, entry: Entry) -> None:
        if self.upstream is None:
            raise NotOwner(f"no gateway to follow request {entry.request_id} from")
        entry.followed = entry.complete = True
        self.upstream.follow(entry, self)

    def stop(self, entry: Entry) -> None:
        """Stop feeding a followed entry (it stays in memory; a new subscriber resumes it after its last event)."""
        if entry.followed and self.upstream is not None:
            self.upstream.stop(entry)

    async def attached(self, entry: Entry, timeout_s: float) -> None:
        assert self.upstream is not None
        await self.upstream.attached(entry, timeout_s)

    def feed(self, entry: Entry, out: Out) -> None:
        if not entry.followed or not self.history.current(entry):
            return
        if entry.last_out is not None and out.offset <= entry.last_out.offset:
            return  # already had it (a reconnect that overlapped)
        self.history.publish(entry, out)

    def reset(self, entry: Entry, reason: str) -> None:
        log.warning("request %s: the owner cannot continue its stream (%s)", entry.request_id, reason)
        self.drop(entry)

    def fail(self, entry: Entry, code: str, message: str) -> None:
        """End the entry's subscriptions with an error (no cursor: a client may resume elsewhere); a subscriber on its
        way gets the same (see Relay.subscribe), and the one after that tries the owner again."""
        if self.history.current(entry):
            entry.failure = {"code": code, "message": message}
            self.hub.end(entry.request_id, "failed", error=entry.failure)

    @staticmethod
    def position(entry: Entry) -> int:
        """How far a followed stream has come: offsets below it that are not its events never will be."""
        return entry.last_out.offset + 1 if entry.last_out is not None else 0

    async def reach(self, entry: Entry, offset: int) -> None:
        """Wait until a followed stream has come past ``offset`` (a cursor another gateway, further ahead, gave)."""
        if entry.terminal is not None or self.position(entry) > offset:
            return
        if offset >= await self.source.log_end(entry.partition):
            raise CursorError("cursor is beyond the end of the stream")
        deadline = asyncio.get_running_loop().time() + CATCH_UP_S
        while entry.terminal is None and self.position(entry) <= offset and entry.followed:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise KafkaUnavailable(f"request {entry.request_id}: the gateway that reads its partition is behind")
            if entry.progress is None:
                entry.progress = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.progress.wait(), remaining)

    def moved(self, gained: set[int], lost: set[int]) -> None:
        """The group moved partitions: follow the watched requests of the lost ones, take over those of the gained.

        A followed request gets the rest of its history from Kafka from where its last event was, an owned one
        resumes from the new owner after its last event. Another gateway's upstream is ended instead, so that
        gateway goes to the new owner itself.
        """
        for entry in list(self.history.entries.values()):
            if entry.partition in lost and not entry.followed:
                self.hub.end(entry.request_id, "moved", forwarded_only=True)
                if self.hub.watched(entry.request_id) and entry.complete and entry.backfill is None:
                    self.follow(entry)
                else:
                    self.drop(entry)
            elif entry.partition in gained and entry.followed:
                self.stop(entry)
                entry.followed = False
                subscribers = self.hub.subscribers(entry.request_id)
                if not subscribers:
                    self.drop(entry)
                    continue
                seen = entry.last_out.offset if entry.last_out is not None else -1
                for sub in subscribers:
                    sub.after_offset = max(sub.after_offset, seen)  # the backfill offers them only what is new
                entry.complete = False
                task = asyncio.create_task(self._take_over(entry))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _take_over(self, entry: Entry) -> None:
        try:
            await self.history.ensure_complete(entry)
        except Exception as exc:
            log.warning("request %s: taking over its stream failed (%s); its subscribers resume", entry.request_id, exc)
            self.drop(entry)

    def drop(self, entry: Entry) -> None:
        """Forget an entry now, ending its subscriptions (their clients resume with their cursors)."""
        if self.history.current(entry):  # one already forgotten has no subscribers: forgetting needs none
            self.hub.end(entry.request_id, "moved")
            self.history.forget(entry)

    def close(self) -> None:
        """Stop every followed stream and hand-over (at shutdown)."""
        for entry in self.history.entries.values():
            self.stop(entry)
        for task in list(self._tasks):
            task.cancel()

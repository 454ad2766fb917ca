"""What waits in the events partitions a gateway reads: accepted requests not started or not ended (a pure fold).

A gateway folds the requests of the partitions it reads from their Accepted record on: which wait (per model, class
and tenant, and since when), which passed their deadline while waiting, and what each used when it ended (for the
quotas' settlement). Only the partition's reader folds a request, so the fleet's figures are the sum over gateways
and a deadline is acted on by one gateway.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from schemas.records import Accepted, Failed, Finished, Started, TokenEvent

UNKNOWN = -1


@dataclass(slots=True)
class Waiting:
    """One accepted request of a partition this gateway reads, until it ends."""

    request_id: str
    partition: int
    model: str
    priority: str
    tenant: str
    accepted_ms: int
    deadline_ms: int | None
    started: bool = False


@dataclass(frozen=True, slots=True)
class Ended:
    """A folded request ended, having used ``tokens`` (prompt + completion: what its quota reservation settles to;
    ``UNKNOWN`` for a run that failed, whose usage no record states: its reservation stands)."""

    request_id: str
    tenant: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Depth:
    """Requests waiting for a worker in one (model, class, tenant), and the oldest one's accept time."""

    count: int
    oldest_ms: int


class QueueBook:
    """Accepted requests of the partitions read here, from Accepted to their end."""

    def __init__(self) -> None:
        self.requests: dict[str, Waiting] = {}
        self.keys: set[bytes] = set()  # the same requests by key bytes: which records to decode
        self._deadlines: list[tuple[int, str]] = []

    def feed(self, partition: int, ev: TokenEvent) -> Ended | None:
        """Fold one event (in log order); an Ended when it ended a folded request."""
        payload = ev.payload
        if isinstance(payload, Accepted):
            if ev.request_id not in self.requests:
                self._add(partition, ev, payload)
            return None
        waiting = self.requests.get(ev.request_id)
        if waiting is None:
            return None
        if isinstance(payload, Started):
            waiting.started = True
        elif isinstance(payload, Finished | Failed):
            self._remove(ev.request_id)
            if isinstance(payload, Finished):
                tokens = payload.usage.prompt_tokens + payload.usage.completion_tokens
            else:
                tokens = UNKNOWN if waiting.started else 0
            return Ended(ev.request_id, waiting.tenant, tokens)
        return None

    def _add(self, partition: int, ev: TokenEvent, accepted: Accepted) -> None:
        waiting = Waiting(
            ev.request_id,
            partition,
            accepted.model,
            accepted.priority,
            accepted.tenant,
            ev.ts_ms,
            accepted.deadline_ms,
        )
        self.requests[ev.request_id] = waiting
        self.keys.add(ev.request_id.encode())
        if accepted.deadline_ms is not None:
            heapq.heappush(self._deadlines, (accepted.deadline_ms, ev.request_id))

    def _remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.keys.discard(request_id.encode())

    def due(self, now_ms: int) -> list[Waiting]:
        """Requests whose deadline passed while they waited (not started, not ended); each is returned once."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            _, request_id = heapq.heappop(self._deadlines)
            waiting = self.requests.get(request_id)
            if waiting is not None and not waiting.started:
                out.append(waiting)
        return out

    def recheck(self, waiting: Waiting, at_ms: int) -> None:
        """Return ``waiting`` from ``due`` again at ``at_ms`` (its deadline could not be acted on yet)."""
        heapq.heappush(self._deadlines, (at_ms, waiting.request_id))

    def drop_partitions(self, lost: set[int]) -> None:
        """Another gateway reads these partitions now: their requests are its to fold."""
        for request_id in [r for r, w in self.requests.items() if w.partition in lost]:
            self._remove(request_id)
        self._deadlines = [(d, r) for d, r in self._deadlines if r in self.requests]
        heapq.heapify(self._deadlines)

    def depths(self) -> dict[tuple[str, str, str], Depth]:
        """Waiting (not started) requests per (model, class, tenant)."""
        out: dict[tuple[str, str, str], Depth] = {}
        for w in self.requests.values():
            if w.started:
                continue
            key = (w.model, w.priority, w.tenant)
            seen = out.get(key, Depth(0, w.accepted_ms))
            out[key] = Depth(seen.count + 1, min(seen.oldest_ms, w.accepted_ms))
        return out

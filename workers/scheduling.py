"""Admission of one served model's look-ahead, pure: classes first, fair share inside each, preemption, deadlines."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from schemas.records import PRIORITIES
from workers.fairshare import FairQueue, Waiting

T = TypeVar("T")

INTERACTIVE, BATCH = PRIORITIES


@dataclass(slots=True, frozen=True)
class RunningView:
    """What the scheduler needs of a running request: its class, its progress in this run, what it has left."""

    key: str
    priority: str
    progress: int
    remaining: int
    preempted: bool = False  # this request was preempted before (the run continues an earlier one it stopped)


@dataclass(slots=True)
class Plan(Generic[T]):
    """One scheduling pass: stop the runs ``preempt`` names (first), then admit ``admit`` in order."""

    admit: list[Waiting[T]] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class QueueStat:
    """Look-ahead of one class and tenant: how many wait, and since when the oldest waits (ms since the epoch)."""

    priority: str
    tenant: str
    depth: int
    oldest_ms: int


class Scheduler(Generic[T]):
    """Waiting requests of both classes, and the decision of what runs next.

    - Interactive requests go first: batch requests are admitted only into slots that no interactive request waits
      for.
    - When interactive requests still wait and batch runs hold slots, batch runs are preempted (those with most left
      first), one per interactive request that has waited ``after_steps`` engine steps (0: at once; more trades
      first-token latency for fewer preemptions, as a slot often frees meanwhile), once they have made a token.
      A request is not preempted again before its new run has made ``min_progress`` tokens: it is stopped at most
      once per ``min_progress`` tokens.
    - Inside a class, tenants share by virtual token counters (``FairQueue``).
    Deadlines are kept in a heap, so the next one is known without a scan.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        preemption: bool = True,
        min_progress: int = 16,
        after_steps: int = 0,
    ):
        self.classes: dict[str, FairQueue[T]] = {p: FairQueue(dict(weights or {})) for p in PRIORITIES}
        self.preemption = preemption
        self.min_progress = min_progress
        self.after_steps = after_steps
        self._deadlines: list[tuple[int, int, str]] = []
        self._waiting: dict[str, Waiting[T]] = {}
        self._pushed = 0

    def push(self, waiting: Waiting[T], *, front: bool = False, arrival: bool = True) -> bool:
        """Queue a request; ``front`` puts it ahead of its tenant's others (a preempted run goes back first);
        ``arrival`` False when its tenant had been waiting all along (see ``FairQueue.push``).

        False when a request of that key already waits (the same request read twice).
        """
        if waiting.key in self._waiting:
            return False
        self.classes[waiting.priority].push(waiting, front=front, arrival=arrival)
        self._waiting[waiting.key] = waiting
        if waiting.deadline_ms is not None:
            self._pushed += 1
            heapq.heappush(self._deadlines, (waiting.deadline_ms, self._pushed, waiting.key))
        return True

    def plan(self, free: int, running: Sequence[RunningView], step: int = 0) -> Plan[T]:
        """What to preempt and admit with ``free`` slots open beside the ``running`` requests, after ``step``
        engine steps."""
        out: Plan[T] = Plan()
        interactive, batch = self.classes[INTERACTIVE], self.classes[BATCH]
        while free > 0 and len(interactive):
            out.admit.append(self._pop(interactive))
            free -= 1
        if len(interactive) and self.preemption:
            overdue = sum(step - w.since_step >= self.after_steps for w in interactive)
            victims = sorted(
                (r for r in running if r.priority == BATCH and r.progress >= self._needed(r)),
                key=lambda r: -r.remaining,
            )
            for victim in victims[:overdue]:
                out.preempt.append(victim.key)
                out.admit.append(self._pop(interactive))
        while free > 0 and not len(interactive) and len(batch):
            out.admit.append(self._pop(batch))
            free -= 1
        return out

    def _needed(self, run: RunningView) -> int:
        """Progress a run needs before it may be preempted: one token at first (a run stopped before any token
        would look, in the log, like one that crashed its worker), ``min_progress`` once it was preempted."""
        return max(1, self.min_progress) if run.preempted else 1

    def blocked(self) -> bool:
        """Interactive requests wait and no slot is theirs yet (a later pass may preempt for them)."""
        return bool(len(self.classes[INTERACTIVE]))

    def charge(self, priority: str, tenant: str, tokens: float) -> None:
        self.classes[priority].charge(tenant, tokens)

    def expired(self, now_ms: int) -> list[Waiting[T]]:
        """Take out and return the waiting requests whose deadline has passed."""
        keys: set[str] = set()
        while self._deadlines and self._deadlines[0][0] < now_ms:
            _, _, key = heapq.heappop(self._deadlines)
            if key in self._waiting:
                keys.add(key)
        return self.remove(lambda w: w.key not in keys) if keys else []

    def next_deadline(self) -> int | None:
        while self._deadlines and self._deadlines[0][2] not in self._waiting:
            heapq.heappop(self._deadlines)  # already admitted or removed
        return self._deadlines[0][0] if self._deadlines else None

    def remove(self, keep: Callable[[Waiting[T]], bool]) -> list[Waiting[T]]:
        """Take out every waiting request for which ``keep`` is False (e.g. of revoked partitions)."""
        gone = [w for queue in self.classes.values() for w in queue.remove(keep)]
        for waiting in gone:
            self._waiting.pop(waiting.key, None)
        return gone

    def get(self, key: str) -> Waiting[T] | None:
        return self._waiting.get(key)

    def depth(self, priority: str) -> int:
        return len(self.classes[priority])

    def holding(self, priority: str, tenant: str) -> int:
        """Requests of ``tenant`` waiting in class ``priority``."""
        return self.classes[priority].waiting_of(tenant)

    def stats(self) -> Iterator[QueueStat]:
        for priority, queue in self.classes.items():
            for tenant, waiting in queue.tenants():
                yield QueueStat(priority, tenant, len(waiting), min(w.since_ms for w in waiting))

    def _pop(self, queue: FairQueue[T]) -> Waiting[T]:
        waiting = queue.pop()
        assert waiting is not None
        del self._waiting[waiting.key]
        return waiting

    def __len__(self) -> int:
        return len(self._waiting)

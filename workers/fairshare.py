"""Per-tenant fair share inside one class, pure: virtual token counters (VTC, OSDI 2024), FIFO per tenant."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Counters of idle tenants are forgotten past this many tenants (a returning tenant is lifted anyway).
MAX_IDLE_COUNTERS = 10_000


@dataclass(slots=True)
class Waiting(Generic[T]):
    """One request in the look-ahead: who sent it, since when it waits, its deadline, and what the caller holds."""

    key: str
    priority: str
    tenant: str
    since_ms: int
    deadline_ms: int | None
    item: T
    cost_hint: float = 1.0  # service charged when it is picked, before its real prompt tokens are known
    since_step: int = 0  # engine steps completed when it entered the look-ahead


@dataclass(slots=True)
class FairQueue(Generic[T]):
    """Waiting requests of one class, picked by the tenant that has received the least weighted service.

    Each tenant has a virtual counter: the tokens served to it divided by its weight. ``pop`` takes the oldest
    request of the backlogged tenant with the lowest counter and charges it the request's ``cost_hint`` at once
    (so several picks in one pass spread over tenants); ``charge`` adds the tokens a tenant's runs then produce.
    A tenant that becomes backlogged again is lifted to the lowest counter of those still waiting (or, when nobody
    waits, to the highest counter): service it did not ask for while idle is not banked as credit. This is VTC's
    rule; it bounds how far any two backlogged tenants' weighted service drifts apart.
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    _queues: dict[str, deque[Waiting[T]]] = field(default_factory=dict)
    _size: int = 0

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def push(self, waiting: Waiting[T], *, front: bool = False, arrival: bool = True) -> None:
        """Queue ``waiting`` behind its tenant's others (``front``: ahead of them, for a preempted run).

        ``arrival`` False: the tenant was backlogged all along (a preempted run, a request read again), so its
        counter keeps what it is owed.
        """
        queue = self._queues.get(waiting.tenant)
        if queue is None:
            if arrival:
                self._lift(waiting.tenant)
            queue = self._queues[waiting.tenant] = deque()
        if front:
            queue.appendleft(waiting)
        else:
            queue.append(waiting)
        self._size += 1

    def pop(self) -> Waiting[T] | None:
        if not self._queues:
            return None
        tenant = min(self._queues, key=lambda t: (self.counters.get(t, 0.0), self._queues[t][0].since_ms))
        queue = self._queues[tenant]
        waiting = queue.popleft()
        if not queue:
            del self._queues[tenant]
        self._size -= 1
        self.charge(tenant, waiting.cost_hint)
        return waiting

    def charge(self, tenant: str, tokens: float) -> None:
        """``tokens`` of service went to ``tenant`` (weighted here)."""
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / self.weight(tenant)

    def remove(self, keep: Callable[[Waiting[T]], bool]) -> list[Waiting[T]]:
        """Take out every waiting request for which ``keep`` is False; returns them."""
        gone: list[Waiting[T]] = []
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            kept = deque(w for w in queue if keep(w))
            if len(kept) != len(queue):
                gone += [w for w in queue if not keep(w)]
                if kept:
                    self._queues[tenant] = kept
                else:
                    del self._queues[tenant]
        self._size -= len(gone)
        return gone

    def _lift(self, tenant: str) -> None:
        own = self.counters.get(tenant, 0.0)
        if self._queues:
            floor = min(self.counters.get(t, 0.0) for t in self._queues)
        else:
            floor = max(self.counters.values(), default=0.0)
            if len(self.counters) > MAX_IDLE_COUNTERS:
                self.counters.clear()  # nobody waits: every idle tenant would be lifted to the top anyway
        self.counters[tenant] = max(own, floor)

    def waiting_of(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue is not None else 0

    def tenants(self) -> Iterator[tuple[str, deque[Waiting[T]]]]:
        return iter(self._queues.items())

    def __iter__(self) -> Iterator[Waiting[T]]:
        for queue in self._queues.values():
            yield from queue

    def __len__(self) -> int:
        return self._size

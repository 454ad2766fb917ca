"""Requests past their tenant's share of the look-ahead, kept as log positions only, pure: read again in turn."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Position(Generic[P]):
    """Where a deferred request is in the log (opaque here), and since when it waits."""

    where: P
    since_ms: int


class Deferred(Generic[P]):
    """Per class and tenant, the positions of requests read but not held, oldest first.

    A tenant holds at most ``per_tenant`` requests of a class in memory; the ones after are deferred (and so is
    every later one while any is deferred, so a tenant's requests keep their order). That lets the reader go on
    past one tenant's deep backlog and find the others' requests, with memory bounded by ``limit`` positions per
    class. A tenant's deferred requests are due to be read again once it holds ``per_tenant // 2`` or fewer.
    """

    def __init__(self, per_tenant: int, limit: int):
        self.per_tenant = max(1, per_tenant)
        self.limit = limit
        self._by: dict[tuple[str, str], deque[Position[P]]] = {}
        self._size: dict[str, int] = {}

    def should_defer(self, priority: str, tenant: str, holding: int) -> bool:
        return (priority, tenant) in self._by or holding >= self.per_tenant

    def add(self, priority: str, tenant: str, where: P, since_ms: int) -> None:
        self._by.setdefault((priority, tenant), deque()).append(Position(where, since_ms))
        self._size[priority] = self._size.get(priority, 0) + 1

    def full(self, priority: str) -> bool:
        return self._size.get(priority, 0) >= self.limit

    def due(self, holding: Callable[[str, str], int]) -> list[tuple[str, str, int]]:
        """(class, tenant, how many to read again) of every tenant whose held requests ran low."""
        out = []
        for (priority, tenant), positions in self._by.items():
            held = holding(priority, tenant)
            if held <= self.per_tenant // 2:
                out.append((priority, tenant, min(len(positions), self.per_tenant - held)))
        return out

    def take(self, priority: str, tenant: str, count: int) -> list[Position[P]]:
        """The ``count`` oldest positions of a tenant, no longer deferred (``restore`` them if reading fails)."""
        positions = self._by.get((priority, tenant))
        if not positions:
            return []
        taken = [positions.popleft() for _ in range(min(count, len(positions)))]
        if not positions:
            del self._by[(priority, tenant)]
        self._size[priority] -= len(taken)
        return taken

    def restore(self, priority: str, tenant: str, positions: list[Position[P]]) -> None:
        """Put taken positions back, ahead of the tenant's others."""
        queue = self._by.setdefault((priority, tenant), deque())
        queue.extendleft(reversed(positions))
        self._size[priority] = self._size.get(priority, 0) + len(positions)

    def forget(self, keep: Callable[[P], bool]) -> int:
        """Drop the positions for which ``keep`` is False (e.g. of revoked partitions); how many were dropped."""
        dropped = 0
        for key in list(self._by):
            positions = self._by[key]
            kept = deque(p for p in positions if keep(p.where))
            dropped_here = len(positions) - len(kept)
            if dropped_here:
                self._size[key[0]] -= dropped_here
                dropped += dropped_here
                if kept:
                    self._by[key] = kept
                else:
                    del self._by[key]
        return dropped

    def stats(self) -> Iterator[tuple[str, str, int, int]]:
        """(class, tenant, deferred requests, oldest since_ms)."""
        for (priority, tenant), positions in self._by.items():
            yield priority, tenant, len(positions), positions[0].since_ms  # positions come oldest first

    def __len__(self) -> int:
        return sum(self._size.values())

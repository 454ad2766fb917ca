"""Iteration-level scheduler: which requests join, run and leave the batch at each decode step (no torch)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class HasId(Protocol):
    @property
    def request_id(self) -> str: ...


S = TypeVar("S", bound=HasId)


@dataclass(slots=True)
class Schedule(Generic[S]):
    """One step: ``running`` decode one token together; ``admitted`` are prefilled and join the batch."""

    running: list[S] = field(default_factory=list)
    admitted: list[S] = field(default_factory=list)
    aborted: list[S] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.running or self.admitted or self.aborted)


class Scheduler(Generic[S]):
    """First come, first served; at most ``max_running`` requests in the batch at a time."""

    def __init__(self, max_running: int):
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.max_running = max_running
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self._aborts: set[str] = set()

    def add(self, seq: S) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Take the request out at the next step; True when it was waiting or running."""
        known = any(s.request_id == request_id for s in self.waiting) or any(
            s.request_id == request_id for s in self.running
        )
        if known:
            self._aborts.add(request_id)
        return known

    def schedule(self) -> Schedule[S]:
        out: Schedule[S] = Schedule()
        if self._aborts:
            out.aborted = [s for s in [*self.running, *self.waiting] if s.request_id in self._aborts]
            self.running = [s for s in self.running if s.request_id not in self._aborts]
            self.waiting = deque(s for s in self.waiting if s.request_id not in self._aborts)
            self._aborts.clear()
        out.running = list(self.running)
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting.popleft()
            self.running.append(seq)
            out.admitted.append(seq)
        return out

    def finish(self, seq: S) -> None:
        self.running = [s for s in self.running if s is not seq]

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._aborts)

"""Iteration-level scheduler: which requests decode, which prefill how much of their prompt, who waits (no torch).

Each step decodes one token for every request whose prompt is in the cache, and spends at most ``prefill_tokens``
(counting padding: rows x longest chunk) on prompts, in arrival order; a long prompt is cut into chunks over several
steps, so it never stalls the running batch for more than one chunk. A request is admitted only while the KV cache
the batch may grow to fits the budget: rows x the longest reservation (prompt + max_tokens) -- the cache is one
rectangle -- otherwise it waits at the head of the queue. A request with n choices counts n rows (its prompt is
prefilled once, then its cache row copied to each choice).

An urgent request (interactive, beside batch work) waits ahead of the others, and a step that prefills it skips the
decode rows when any of them is not urgent: its first token then costs a short prefill step, not a full batch step
(at most every other step, so the batch always advances).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def prompt_len(self) -> int: ...
    @property
    def reserve(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def urgent(self) -> bool: ...


S = TypeVar("S", bound=Schedulable)


@dataclass(slots=True)
class Chunk(Generic[S]):
    """Prompt tokens ``start``..``start + length`` of ``seq``; ``last`` when this finishes its prompt."""

    seq: S
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length >= self.seq.prompt_len


@dataclass(slots=True)
class Schedule(Generic[S]):
    """One step: ``decode`` rows advance one token; ``prefill`` chunks run; ``admitted`` got a cache row this step."""

    decode: list[S] = field(default_factory=list)
    prefill: list[Chunk[S]] = field(default_factory=list)
    admitted: list[S] = field(default_factory=list)
    aborted: list[S] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill or self.aborted)


class Scheduler(Generic[S]):
    """First come, first served under three limits: rows, prefill tokens per step, KV-cache tokens."""

    def __init__(self, max_running: int, prefill_tokens: int = 512, kv_tokens: int = 1 << 62):
        if max_running < 1 or prefill_tokens < 1 or kv_tokens < 1:
            raise ValueError("max_running, prefill_tokens and kv_tokens must be at least 1")
        self.max_running = max_running
        self.prefill_tokens = prefill_tokens
        self.kv_tokens = kv_tokens
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self.computed: dict[str, int] = {}
        self._aborts: set[str] = set()
        self._held = False  # the last step skipped its decode rows for an urgent prompt

    def add(self, seq: S) -> None:
        if seq.urgent:  # ahead of every waiting request that is not urgent, behind the urgent ones
            at = next((i for i, s in enumerate(self.waiting) if not s.urgent), len(self.waiting))
            self.waiting.insert(at, seq)
        else:
            self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Take the request out at the next step; True when it was waiting or running."""
        known = any(s.request_id == request_id for s in self.waiting) or any(
            s.request_id == request_id for s in self.running
        )
        if known:
            self._aborts.add(request_id)
        return known

    def fits(self, seq: S, rows: list[S]) -> bool:
        """Whether ``seq`` joining ``rows`` keeps the cache rectangle within the KV budget."""
        if not rows:
            return True  # alone it always runs: the engine sizes the budget to hold one full context
        widest = max(max(r.reserve for r in rows), seq.reserve)
        return (sum(r.rows for r in rows) + seq.rows) * widest <= self.kv_tokens

    def schedule(self) -> Schedule[S]:
        out: Schedule[S] = Schedule()
        if self._aborts:
            out.aborted = [s for s in [*self.running, *self.waiting] if s.request_id in self._aborts]
            self.running = [s for s in self.running if s.request_id not in self._aborts]
            self.waiting = deque(s for s in self.waiting if s.request_id not in self._aborts)
            for s in out.aborted:
                self.computed.pop(s.request_id, None)
            self._aborts.clear()
        out.decode = [s for s in self.running if self.computed[s.request_id] >= s.prompt_len]
        for seq in self.running:
            done = self.computed[seq.request_id]
            if done < seq.prompt_len and not self._take(out, seq, done):
                return self._urgent_first(out)
        while self.waiting and self._room(self.waiting[0]) and self.fits(self.waiting[0], self.running):
            seq = self.waiting[0]
            if not self._take(out, seq, 0):
                break
            self.waiting.popleft()
            self.running.append(seq)
            out.admitted.append(seq)
        return self._urgent_first(out)

    def _urgent_first(self, out: Schedule[S]) -> Schedule[S]:
        """Hold the decode rows for one step when it prefills an urgent prompt beside rows that are not urgent."""
        hold = not self._held and any(c.seq.urgent for c in out.prefill) and any(not s.urgent for s in out.decode)
        self._held = hold
        if hold:
            out.decode = []
        return out

    def _room(self, seq: S) -> bool:
        """Whether ``seq``'s rows fit beside the running ones (a request wider than the batch runs alone)."""
        taken = sum(r.rows for r in self.running)
        return taken + seq.rows <= self.max_running or not self.running

    def _take(self, out: Schedule[S], seq: S, done: int) -> bool:
        """Add the next chunk of ``seq``'s prompt if the step's prefill budget has room; False when full."""
        chunks = out.prefill
        widest = max((c.length for c in chunks), default=0)
        length = min(seq.prompt_len - done, self.prefill_tokens)
        if chunks and (len(chunks) + 1) * max(widest, length) > self.prefill_tokens:
            # Padding would overrun the budget: a shorter chunk may still fit beside the others.
            length = min(length, self.prefill_tokens // (len(chunks) + 1))
            if length < 1 or (len(chunks) + 1) * max(widest, length) > self.prefill_tokens:
                return False
        chunks.append(Chunk(seq, done, length))
        self.computed[seq.request_id] = done + length
        return True

    def finish(self, seq: S) -> None:
        self.running = [s for s in self.running if s is not seq]
        self.computed.pop(seq.request_id, None)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def kv_reserved(self) -> int:
        """KV-cache tokens the running requests hold: the cache is rows x the widest reservation."""
        running = self.running  # one list: another thread (the metrics reader) sees a consistent snapshot
        return len(running) * max((s.reserve for s in running), default=0)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._aborts)

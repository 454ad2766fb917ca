"""The ledger of a served model's requests: what each is, where it came from, which run the engine knows it by."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from schemas.records import InferenceRequest
from services.tracing import NO_TRACE, TraceHeaders
from workers.history import Prior
from workers.publisher import RunStream
from workers.spans import RunSpans


@dataclass(slots=True)
class Ticket:
    """A request taken from the intake: the record and its position (opaque here), until its terminal event is in."""

    request: InferenceRequest
    source: Any
    created_ms: int
    priority: str = "interactive"  # the class of the topic it came from
    check_log: bool = False  # the log may hold earlier runs of it: read them before it runs
    preemptions: int = 0  # times this worker stopped its run for interactive work
    handed_over: Prior | None = None  # a preempted run's state, as its acknowledged events left it in the log
    trace: TraceHeaders = NO_TRACE  # the request record's W3C trace context (read only while tracing is on)
    appended_ms: int = 0  # the request record's timestamp
    queued_ns: int = 0  # when this worker last queued it (set only while tracing is on)
    lease: object = None  # the intake's hold on its record when it was taken (opaque here; see workers/intake.py)


@dataclass(slots=True)
class Active:
    """A request this worker is running: its ticket, its current run and how far it got."""

    ticket: Ticket
    stream: RunStream
    prompt_tokens: int
    completion: int
    solo: bool = False
    continued_ids: tuple[int, ...] = ()  # tokens earlier runs left in the log: what this run started from
    continued_text: str = ""
    text: str = ""  # the whole answer so far (set to continued_text when the run starts)
    in_engine: bool = False
    started: float = field(default_factory=time.monotonic)
    last_token: float | None = None
    first_token_ms: int = 0
    choice_finish_reasons: tuple[str, ...] = ()  # n > 1: each choice's, from the engine's last output
    spans: RunSpans | None = None  # while tracing is on

    @property
    def request_id(self) -> str:
        return self.ticket.request.request_id

    @property
    def run_id(self) -> str:
        return self.stream.run_id

    @property
    def progress(self) -> int:
        """Tokens this run has generated itself."""
        return self.completion - len(self.continued_ids)


class Ledger:
    """Active requests by request id, and the runs the engine is running by run id.

    The engine knows a run by its run id, not its request id: after a rebalance the same request can be taken again
    while the engine still winds down the abandoned run, and the two must never be confused.
    """

    def __init__(self) -> None:
        self._requests: dict[str, Active] = {}
        self._runs: dict[str, Active] = {}

    def add(self, active: Active) -> None:
        self._requests[active.request_id] = active

    def running(self, active: Active) -> None:
        """The engine now runs ``active``'s run."""
        active.in_engine = True
        self._runs[active.run_id] = active

    def get(self, request_id: str) -> Active | None:
        return self._requests.get(request_id)

    def run(self, run_id: str) -> Active | None:
        return self._runs.get(run_id)

    def run_ended(self, run_id: str) -> None:
        """The engine is done with this run (finished or aborted)."""
        active = self._runs.pop(run_id, None)
        if active is not None:
            active.in_engine = False

    def remove(self, active: Active) -> None:
        """Forget ``active`` if it is still the request's current run."""
        if self._requests.get(active.request_id) is active:
            del self._requests[active.request_id]

    def select(self, keep: Callable[[Active], bool]) -> list[Active]:
        return [a for a in self._requests.values() if keep(a)]

    def __iter__(self) -> Iterator[Active]:
        return iter(list(self._requests.values()))

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def runs(self) -> int:
        return len(self._runs)

"""The rules of one request's event log, folded in one place: run fencing, continuations, gaps, one terminal."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import assert_never

from schemas.records import Accepted, Deleted, Delta, Failed, Finished, Started, TokenEvent


class Change(enum.Enum):
    """What one event did to the request's state (``RunLog.feed`` returns None for events that change nothing)."""

    ACCEPTED = "accepted"  # a gateway accepted the request; no run yet
    STARTED = "started"  # the first run started
    CONTINUED = "continued"  # a new run took over exactly where the current one stopped: invisible to clients
    RESTARTED = "restarted"  # a new run that keeps less (or other) text than clients have seen
    DELTA = "delta"  # new tokens of the current run
    GAP = "gap"  # the current run skipped a seq: it is broken, nothing of it past the gap counts
    TERMINAL = "terminal"  # Finished or Failed: the request has ended


@dataclass(slots=True)
class Run:
    """One processing attempt as the log shows it, up to its last contiguous event."""

    run_id: str
    base_tokens: int = 0
    tokens: int = 0
    text: str = ""
    token_ids: list[int] | None = None
    last_seq: int = 0
    broken: bool = False

    @property
    def progressed(self) -> bool:
        return self.tokens > self.base_tokens


@dataclass(slots=True)
class RunLog:
    """Folds one request's TokenEvents, in log order, into its state.

    - A Started with a new run id (seq 0) makes that run current; older runs are fenced from then on.
    - Events of the current run count only while its seq is contiguous: a gap marks the run broken (a worker
      never continues past an event it could not publish, so a gap is a fault, never text).
    - A Finished or Failed at seq 0 of a run that never started is terminal too (a refusal before any Started).
    - Exactly one terminal event; everything after it is ignored.
    ``keep_ids`` also keeps the token ids of the current run (what a continuing worker needs; a gateway does not).
    """

    request_id: str
    keep_ids: bool = False
    current: Run | None = None
    accepted: Accepted | None = None
    started: Started | None = None
    terminal: TokenEvent | None = None
    deleted: Deleted | None = None
    old_runs: set[str] = field(default_factory=set)
    _stalled_before: int = 0

    def feed(self, ev: TokenEvent) -> Change | None:
        if ev.request_id != self.request_id:
            return None
        payload = ev.payload
        if isinstance(payload, Deleted):  # usually after the end: it hides the stored answer, it changes no run
            self.deleted = self.deleted or payload
            return None
        if self.terminal is not None:
            return None
        match payload:
            case Accepted():
                if self.accepted is not None:
                    return None
                self.accepted = payload
                return Change.ACCEPTED
            case Started():
                return self._start(ev, payload)
            case Delta() | Finished() | Failed():
                return self._in_run(ev, payload)
            case Deleted():
                return None
            case _:
                assert_never(payload)

    def _in_run(self, ev: TokenEvent, payload: Delta | Finished | Failed) -> Change | None:
        """An event that belongs to a run: counted only for the current run, in seq order."""
        run = self.current
        if run is None or ev.run_id != run.run_id:
            if ev.seq == 0 and ev.run_id not in self.old_runs and not isinstance(payload, Delta):
                self.terminal = ev
                return Change.TERMINAL
            return None  # a fenced run, or a run whose Started this log does not hold
        if run.broken or ev.seq <= run.last_seq:
            return None  # past a gap, or an at-least-once duplicate
        if ev.seq > run.last_seq + 1:
            run.broken = True
            return Change.GAP
        run.last_seq = ev.seq
        match payload:
            case Delta():
                if payload.index:  # n > 1: a run's text is its choice 0's (such a run is restarted, not continued)
                    return Change.DELTA
                run.tokens += len(payload.token_ids)
                run.text += payload.text
                if run.token_ids is not None:
                    run.token_ids.extend(payload.token_ids)
                return Change.DELTA
            case Finished() | Failed():
                self.terminal = ev
                return Change.TERMINAL
            case _:
                assert_never(payload)

    def _start(self, ev: TokenEvent, started: Started) -> Change | None:
        if ev.seq != 0 or ev.run_id in self.old_runs or (self.current is not None and ev.run_id == self.current.run_id):
            return None
        previous = self.current
        run = Run(ev.run_id, base_tokens=started.continued_tokens, tokens=started.continued_tokens)
        run.text = started.continued_text
        continues = previous is not None and started.continues_run_id == previous.run_id
        if self.keep_ids:
            known = previous.token_ids if continues and previous is not None else None
            # Without the ids of the continued prefix the tokens cannot be rebuilt: count them as lost.
            run.token_ids = list(known[: started.continued_tokens]) if known is not None else []
            if known is None or len(known) < started.continued_tokens:
                run.base_tokens = run.tokens = 0
                run.token_ids, run.text = [], ""
        if previous is not None:
            self.old_runs.add(previous.run_id)
            self._stalled_before = 0 if previous.progressed else self._stalled_before + 1
        self.current = run
        self.started = started
        if previous is None:
            return Change.STARTED
        if continues and previous is not None and started.continued_tokens == previous.tokens:
            return Change.CONTINUED
        return Change.RESTARTED

    @property
    def stalled_runs(self) -> int:
        """Runs in a row, up to the current one, that ended or stopped without a single new token."""
        if self.current is None or self.current.progressed:
            return 0
        return self._stalled_before + 1

    @property
    def known(self) -> bool:
        """Whether the log holds anything of the request."""
        return self.accepted is not None or self.current is not None or self.terminal is not None

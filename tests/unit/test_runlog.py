"""The one fold of a request's log: fencing, continuations, gaps, refusals before a start, stalled runs."""

from __future__ import annotations

from schemas.records import Accepted, Delta, Failed, Finished, Payload, Started, TokenEvent, Usage
from schemas.runlog import Change, RunLog


def _ev(run: str, seq: int, payload: Payload, rid: str = "r") -> TokenEvent:
    return TokenEvent(rid, run, seq, 0, payload)


def _feed(fold: RunLog, *events: TokenEvent) -> list[Change | None]:
    return [fold.feed(ev) for ev in events]


def test_a_failed_before_any_started_is_terminal() -> None:
    fold = RunLog("r")
    changes = _feed(fold, _ev("", 0, Accepted("default", "t")), _ev("a", 0, Failed("prompt_too_long", "too long")))
    assert changes == [Change.ACCEPTED, Change.TERMINAL]
    assert fold.terminal is not None and fold.accepted == Accepted("default", "t")


def test_a_refusal_of_a_new_run_ends_a_request_that_had_started() -> None:
    fold = RunLog("r")
    _feed(fold, _ev("a", 0, Started("w", "m", 1, 0)), _ev("a", 1, Delta("x", (1,))))
    assert fold.feed(_ev("b", 0, Failed("worker_crashed", "..."))) is Change.TERMINAL


def test_a_fenced_runs_events_change_nothing() -> None:
    fold = RunLog("r")
    _feed(fold, _ev("a", 0, Started("w", "m", 1, 0)), _ev("b", 0, Started("w", "m", 1, 0)))
    assert _feed(fold, _ev("a", 1, Delta("x", (1,))), _ev("a", 0, Failed("x", "y"))) == [None, None]
    assert fold.terminal is None


def test_a_gap_breaks_the_run_until_a_new_run_continues_it() -> None:
    fold = RunLog("r", keep_ids=True)
    changes = _feed(
        fold,
        _ev("a", 0, Started("w", "m", 1, 0)),
        _ev("a", 1, Delta("ab", (1, 2))),
        _ev("a", 3, Delta("c", (3,))),
        _ev("a", 4, Finished("length", Usage(1, 3))),
    )
    assert changes == [Change.STARTED, Change.DELTA, Change.GAP, None]
    assert fold.terminal is None
    cont = Started("w2", "m", 1, 0, continues_run_id="a", continued_tokens=2, continued_text="ab")
    assert fold.feed(_ev("b", 0, cont)) is Change.CONTINUED
    assert fold.current is not None and fold.current.token_ids == [1, 2] and fold.current.text == "ab"


def test_a_continuation_that_keeps_less_than_was_seen_is_a_restart() -> None:
    fold = RunLog("r")
    _feed(fold, _ev("a", 0, Started("w", "m", 1, 0)), _ev("a", 1, Delta("ab", (1, 2))))
    cont = Started("w2", "m", 1, 0, continues_run_id="a", continued_tokens=1, continued_text="a")
    assert fold.feed(_ev("b", 0, cont)) is Change.RESTARTED


def test_duplicates_and_events_after_the_terminal_are_ignored() -> None:
    fold = RunLog("r")
    started = _ev("a", 0, Started("w", "m", 1, 0))
    delta = _ev("a", 1, Delta("x", (1,)))
    assert _feed(fold, started, delta, delta, started) == [Change.STARTED, Change.DELTA, None, None]
    _feed(fold, _ev("a", 2, Finished("stop", Usage(1, 1))))
    assert _feed(fold, _ev("b", 0, Started("w", "m", 1, 0)), _ev("c", 0, Failed("x", "y"))) == [None, None]
    assert fold.feed(_ev("a", 1, Delta("x", (1,)), rid="other")) is None


def test_stalled_runs_count_runs_in_a_row_without_a_new_token() -> None:
    fold = RunLog("r")
    fold.feed(_ev("a", 0, Started("w", "m", 1, 0)))
    assert fold.stalled_runs == 1
    fold.feed(_ev("a", 1, Delta("x", (1,))))
    assert fold.stalled_runs == 0
    cont = Started("w", "m", 1, 0, continues_run_id="a", continued_tokens=1, continued_text="x")
    fold.feed(_ev("b", 0, cont))
    assert fold.stalled_runs == 1  # b has no token of its own yet
    fold.feed(_ev("c", 0, Started("w", "m", 1, 0, continues_run_id="b", continued_tokens=1, continued_text="x")))
    assert fold.stalled_runs == 2
    fold.feed(_ev("c", 1, Delta("y", (2,))))
    assert fold.stalled_runs == 0

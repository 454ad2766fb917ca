"""`tokenrelay trace`'s fold: one request's records in, its timeline out (runs, continuations, end)."""

from __future__ import annotations

import json

from schemas.records import Accepted, Delta, Failed, Finished, Payload, Started, TokenEvent, Usage
from services.cli.timeline import Position, build_timeline, render_table

RID = "01890a5d-ac96-774b-bcce-b302099a8057"
T0 = 1_700_000_000_000


class Log:
    """Events of one request as its events partition holds them (offsets count up)."""

    def __init__(self) -> None:
        self.events: list[tuple[Position, TokenEvent]] = []

    def add(self, at: int, run: str, seq: int, payload: Payload, rid: str = RID) -> Log:
        where = Position("t.events", 3, 100 + len(self.events), T0 + at + 1)
        self.events.append((where, TokenEvent(rid, run, seq, T0 + at, payload)))
        return self


QUEUED = Position("t.requests.default", 5, 42, T0 + 2)


def _started(worker: str, **kw: object) -> Started:
    return Started(worker, "default", 7, 12, **kw)  # type: ignore[arg-type]


def test_a_request_that_ran_once() -> None:
    log = (
        Log()
        .add(0, "", 0, Accepted("default", "k_1", priority="interactive"))
        .add(14, "a", 0, _started("w1"))
        .add(40, "a", 1, Delta("Hel", (1,)))
        .add(45, "a", 2, Delta("lo", (2, 3)))
        .add(50, "a", 3, Finished("length", Usage(7, 3), ttft_ms=26, total_ms=36))
    )
    t = build_timeline(RID, log.events, QUEUED)
    assert [s.what for s in t.steps] == ["accepted", "queued", "started", "first_token", "end"]
    assert [t.relative(s.ts_ms) for s in t.steps] == [0, 2, 14, 40, 50]
    assert (t.status, t.model, t.priority, t.tenant, t.origin_ms) == ("finished", "default", "interactive", "k_1", T0)
    (run,) = t.runs
    assert (run.worker, run.how, run.tokens, run.ended, run.first_token_ms) == ("w1", "started", 3, "finished", T0 + 40)
    data = json.loads(json.dumps(t.to_json()))
    queued = data["steps"][1]
    assert (queued["topic"], queued["partition"], queued["offset"], queued["at_ms"]) == ("t.requests.default", 5, 42, 2)
    end = data["steps"][-1]
    assert end["finish_reason"] == "length" and end["completion_tokens"] == 3 and end["at_ms"] == 50
    assert data["runs"][0]["first_token_at_ms"] == 40
    table = render_table(t)
    assert "status=finished" in table and "tenant=k_1" in table
    assert "t.requests.default[5]@42" in table and "finished length" in table


def test_a_worker_death_and_a_continuation_on_another_worker() -> None:
    log = (
        Log()
        .add(0, "", 0, Accepted("default"))
        .add(10, "a", 0, _started("w1"))
        .add(20, "a", 1, Delta("ab", (1, 2)))
        .add(5000, "b", 0, _started("w2", continues_run_id="a", continued_tokens=2, continued_text="ab"))
        .add(5020, "b", 1, Delta("c", (3,)))
        .add(5030, "b", 2, Finished("stop", Usage(7, 3)))
    )
    t = build_timeline(RID, log.events, QUEUED)
    assert [s.what for s in t.steps] == ["accepted", "queued", "started", "first_token", "stopped", "continued", "end"]
    stopped, continued = t.steps[4], t.steps[5]
    assert (t.relative(stopped.ts_ms), stopped.run_id, stopped.where.offset) == (20, "a", 102)
    assert continued.details["handover"] == "other_worker" and continued.details["continued_tokens"] == 2
    assert [(r.run_id, r.how, r.tokens, r.ended) for r in t.runs] == [
        ("a", "started", 2, "superseded"),
        ("b", "continued", 1, "finished"),
    ]
    assert "another worker continued it" in render_table(t)


def test_a_preempted_run_continued_by_the_same_worker() -> None:
    log = (
        Log()
        .add(0, "", 0, Accepted("default", priority="batch"))
        .add(10, "a", 0, _started("w1"))
        .add(20, "a", 1, Delta("ab", (1, 2)))
        .add(90, "b", 0, _started("w1", continues_run_id="a", continued_tokens=2, continued_text="ab"))
    )
    t = build_timeline(RID, log.events)
    assert t.status == "running" and t.priority == "batch"
    assert t.steps[-1].what == "continued" and t.steps[-1].details["handover"] == "same_worker"
    assert [r.ended for r in t.runs] == ["superseded", "running"]


def test_a_restart_that_keeps_less_than_was_seen() -> None:
    log = (
        Log()
        .add(10, "a", 0, _started("w1"))
        .add(20, "a", 1, Delta("ab", (1, 2)))
        .add(30, "b", 0, _started("w2", continues_run_id="a", continued_tokens=1, continued_text="a"))
    )
    t = build_timeline(RID, log.events, id_time_ms=T0 + 5)
    assert [s.what for s in t.steps] == ["started", "first_token", "stopped", "restarted"]
    assert t.origin_ms == T0 + 5 and t.model == "default"  # no Accepted: from the id's time; the model from Started


def test_a_refusal_before_any_start_ends_it_failed() -> None:
    log = (
        Log().add(0, "", 0, Accepted("default")).add(30, "a", 0, Failed("prompt_too_long", "the prompt is 9000 tokens"))
    )
    t = build_timeline(RID, log.events, QUEUED)
    assert [s.what for s in t.steps] == ["accepted", "queued", "end"]
    assert t.status == "failed" and t.runs == []
    assert t.steps[-1].details == {
        "error": "prompt_too_long",
        "message": "the prompt is 9000 tokens",
        "retriable": False,
    }
    assert "failed prompt_too_long" in render_table(t)


def test_fenced_runs_duplicates_and_events_after_the_end_change_nothing() -> None:
    log = (
        Log()
        .add(10, "a", 0, _started("w1"))
        .add(20, "a", 1, Delta("x", (1,)))
        .add(30, "b", 0, _started("w2", continues_run_id="a", continued_tokens=1, continued_text="x"))
        .add(31, "a", 2, Delta("zombie", (9,)))  # the fenced run's late event
        .add(40, "b", 1, Delta("y", (2,)))
        .add(40, "b", 1, Delta("y", (2,)))  # at-least-once duplicate
        .add(50, "b", 2, Finished("stop", Usage(7, 2)))
        .add(60, "b", 3, Failed("late", "after the end"))
    )
    t = build_timeline(RID, log.events)
    assert [s.what for s in t.steps] == ["started", "first_token", "stopped", "continued", "end"]
    assert [r.tokens for r in t.runs] == [1, 1]
    assert t.steps[-1].details["finish_reason"] == "stop"


def test_a_gap_breaks_the_run() -> None:
    log = Log().add(10, "a", 0, _started("w1")).add(20, "a", 1, Delta("x", (1,))).add(30, "a", 3, Delta("z", (3,)))
    t = build_timeline(RID, log.events)
    assert t.steps[-1].what == "gap" and t.steps[-1].details == {"seq": 3}
    assert t.runs[0].ended == "gap" and t.status == "running"


def test_an_unknown_request_and_one_still_queued() -> None:
    unknown = build_timeline(RID, [], None, id_time_ms=T0)
    assert unknown.status == "unknown" and "nothing of it in the log" in render_table(unknown)
    queued = build_timeline(RID, Log().add(0, "", 0, Accepted("default")).events, QUEUED)
    assert queued.status == "queued" and [s.what for s in queued.steps] == ["accepted", "queued"]
    other = build_timeline(RID, Log().add(0, "x", 0, Delta("not ours", (1,)), rid="other").events)
    assert other.status == "unknown"


def test_an_accepted_that_landed_after_the_start_still_opens_the_timeline() -> None:
    """The gateway writes its Accepted beside the request record: a quick worker's Started may be logged first."""
    log = (
        Log()
        .add(3, "a", 0, _started("w1"))
        .add(4, "", 0, Accepted("default", "k_1", priority="interactive"))
        .add(9, "a", 1, Finished("length", Usage(7, 0), ttft_ms=0, total_ms=6))
    )
    t = build_timeline(RID, log.events, QUEUED)
    assert [s.what for s in t.steps] == ["accepted", "queued", "started", "end"]
    assert t.origin_ms == T0 + 4

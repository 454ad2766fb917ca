"""The chaos run's invariants (bench/chaos_checks.py) on scripted logs and traces."""

from __future__ import annotations

from bench.chaos_checks import (
    Fault,
    Trace,
    check,
    fold,
    log_totals,
    memory_bounded,
    reference_key,
    stalls_by_fault,
)
from schemas.records import Delta, Failed, Finished, Started, TokenEvent, Usage

RID = "0190a0b0-0000-7000-8000-000000000001"
OTHER = "0190a0b0-0000-7000-8000-000000000002"


def records(
    rid: str, words: list[str], *, run: str = "r1", end: bool = True, offset: int = 0
) -> list[tuple[int, int, TokenEvent]]:
    events = [TokenEvent(rid, run, 0, 1, Started("w", "m", 3, 1))]
    events += [TokenEvent(rid, run, i, 1, Delta(w, (i,))) for i, w in enumerate(words, 1)]
    if end:
        events.append(TokenEvent(rid, run, len(words) + 1, 1, Finished("length", Usage(3, len(words)))))
    return [(0, offset + i, ev) for i, ev in enumerate(events)]


def client_of(rid: str, log: list[tuple[int, int, TokenEvent]], kind: str = "native") -> Trace:
    """A trace that saw exactly the log's stream."""
    f = fold(rid, log)
    trace = Trace(kind, rid, "p", 2, greedy=True, ids=list(f.ids), events=list(f.events))
    trace.end, trace.terminals = f.end, 1
    trace.arrivals = [float(i) for i in range(len(f.ids))]
    return trace


def test_a_client_that_saw_the_log_stream_breaks_nothing() -> None:
    log = records(RID, [" a", " b"])
    f = fold(RID, log)
    assert (f.text, f.end, f.finish_reason, f.completion_tokens) == (" a b", "done", "length", 2)
    verdict = check([client_of(RID, log)], {RID: log}, {reference_key("p", 2): " a b"})
    assert all(verdict.invariants().values()), verdict
    assert verdict.greedy_checked == 1


def test_a_missing_or_repeated_event_is_a_gap_or_a_repeat() -> None:
    log = records(RID, [" a", " b", " c"])
    missing = client_of(RID, log)
    del missing.ids[2], missing.events[2]
    repeated = client_of(RID, log)
    repeated.ids.insert(2, repeated.ids[2])
    repeated.events.insert(2, repeated.events[2])
    assert check([missing], {RID: log}, {}).gaps == [RID]
    verdict = check([repeated], {RID: log}, {})
    assert verdict.repeats == [RID] and verdict.text_mismatch == [RID]


def test_unended_requests_count_whether_a_client_followed_them_or_not() -> None:
    log = {RID: records(RID, [" a"], end=False), OTHER: records(OTHER, [" b"], end=False)}
    trace = client_of(RID, log[RID])
    verdict = check([trace], log, {})
    assert verdict.unended == [RID] and verdict.log_only_unended == [OTHER]
    assert not verdict.invariants()["every accepted request ended"]


def test_greedy_text_must_equal_its_reference_and_two_ends_are_a_repeat() -> None:
    log = records(RID, [" a", " b"])
    trace = client_of(RID, log)
    trace.terminals = 2
    verdict = check([trace], {RID: log}, {reference_key("p", 2): " a c"})
    assert verdict.greedy_mismatch == [RID] and verdict.repeated_end == [RID]


def test_openai_streams_compare_text_and_numbering() -> None:
    log = records(RID, [" a", " b"])
    whole = Trace("responses", RID, "p", 2, greedy=False, seqs=[0, 1, 2, 3], text=" a b", end="completed")
    cut = Trace("chat", RID, "p", 2, greedy=False, text=" a", cut=True)
    skipped = Trace("responses", RID, "p", 2, greedy=False, seqs=[0, 1, 3], text=" a b", end="completed")
    wrong = Trace("chat", RID, "p", 2, greedy=False, text=" a x", end="length")
    assert all(check([whole], {RID: log}, {}).invariants().values())
    assert check([cut], {RID: log}, {}).cut_streams == 1
    assert check([skipped], {RID: log}, {}).gaps == [RID]
    assert check([wrong], {RID: log}, {}).text_mismatch == [RID]


def test_a_fenced_runs_terminal_is_not_a_second_end_and_totals_follow_the_fold() -> None:
    log = records(RID, [" a"], run="r1", end=False)
    log += records(RID, [" a", " b"], run="r2", offset=len(log))
    log.append((0, len(log), TokenEvent(RID, "r1", 2, 1, Finished("length", Usage(3, 1)))))
    failed = [(1, 0, TokenEvent(OTHER, "r9", 0, 1, Failed("too_long", "prompt too long", False)))]
    f = fold(RID, log)
    assert f.restarted and f.text == " a b" and f.terminal_records == 2
    assert log_totals({RID: log, OTHER: failed}) == {
        "requests": 1,
        "failed": 1,
        "prompt_tokens": 3,
        "completion_tokens": 2,
    }


def test_stalls_are_attributed_to_the_faults_they_overlap() -> None:
    trace = Trace("native", RID, "p", 2, greedy=False, arrivals=[0.0, 1.0, 9.0, 9.5, 30.0])
    faults = [Fault("sigkill", "broker-2", 2.0, 8.0), Fault("outage", "cluster", 20.0, 25.0)]
    assert stalls_by_fault([trace], faults) == {"none": 1.0, "sigkill broker": 8.0, "outage": 20.5}


def test_memory_is_bounded_unless_the_late_samples_grow_well_past_the_early_ones() -> None:
    flat = [(float(t), 100.0 + t % 3) for t in range(40)]
    growing = [(float(t), 100.0 + 20 * t) for t in range(40)]
    assert memory_bounded(flat)[0]
    assert not memory_bounded(growing)[0]
    assert memory_bounded(growing[:5])[0]  # too few samples to judge

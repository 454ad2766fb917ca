"""Pure analytics maths: log histograms, tumbling windows, idempotent counting under replay and re-runs."""

from __future__ import annotations

import copy
import math
import random

import pytest

from schemas.records import Delta, Failed, Finished, Started, TokenEvent, Usage
from services.analytics import aggregate
from services.analytics.aggregate import GAMMA, Histogram, apply_event, merge_states, new_partition_state
from services.analytics.page import render

RID = "01890a5d-ac96-774b-bcce-b302099a8057"


def test_percentiles_are_within_the_bucket_error() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(4, 1) for _ in range(5000)]
    hist = Histogram()
    for v in values:
        hist.add(v)
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99):
        exact = ordered[math.ceil(q * len(ordered)) - 1]
        assert abs(hist.percentile(q) - exact) / exact <= math.sqrt(GAMMA) - 1 + 1e-9  # type: ignore[operator]
    assert hist.total == 5000
    assert len(hist.counts) < 200  # bounded whatever the count


def test_histogram_merge_and_json_round_trip() -> None:
    a, b = Histogram(), Histogram()
    for v in (1, 2, 3):
        a.add(v)
    for v in (100, 200):
        b.add(v)
    a.merge(Histogram.from_json(b.to_json()))
    assert a.total == 5
    assert Histogram().percentile(0.5) is None
    assert a.summary()["count"] == 5


def test_window_start_is_tumbling() -> None:
    assert aggregate.window_start(125_000, 60) == 120_000
    assert aggregate.window_start(120_000, 60) == 120_000
    assert aggregate.window_start(119_999, 60) == 60_000


def _events(rid: str = RID, tokens: int = 4, run: str = "r1", t0: int = 1_000_000) -> list[TokenEvent]:
    out = [TokenEvent(rid, run, 0, t0, Started("w", "m1", 3, 10, tenant="k1"))]
    out += [TokenEvent(rid, run, i + 1, t0 + 50 + i * 20, Delta("x", (i,))) for i in range(tokens)]
    out.append(TokenEvent(rid, run, tokens + 1, t0 + 200, Finished("stop", Usage(3, tokens), ttft_ms=40, total_ms=150)))
    return out


def _run(
    events: list[TokenEvent], state: dict | None = None, table: dict | None = None, start: int = 0
) -> tuple[dict, dict]:
    state = state if state is not None else new_partition_state()
    table = table if table is not None else {}
    for offset, ev in enumerate(events, start):
        outcome = apply_event(state, table.get(ev.request_id), ev, 0, offset, 60)
        if outcome.request is not None:
            table[ev.request_id] = outcome.request
    return state, table


def test_finished_counts_usage_and_latency() -> None:
    state, _ = _run(_events())
    row = state["by_model"]["m1"]
    assert row == {"requests": 1, "failed": 0, "prompt_tokens": 3, "completion_tokens": 4}
    assert state["by_tenant"]["k1"]["completion_tokens"] == 4
    (window,) = state["windows"].values()
    view = aggregate.latency_view(merge_states([state]), 60)
    ttft = view["windows"][0]["ttft"]["p50"]
    assert abs(ttft - 50) / 50 < 0.05  # queue 10 + ttft 40
    itl = view["windows"][0]["itl"]["p50"]
    assert abs(itl - (150 - 10 - 40) / 3) / 33.3 < 0.05
    assert window["completion_tokens"] == 4


def test_replaying_the_log_counts_nothing_twice() -> None:
    events = _events()
    state, table = _run(events)
    before = aggregate.usage_view(merge_states([state]), 60)
    _run(events, state, table)  # a restart that replays from an old committed offset
    assert aggregate.usage_view(merge_states([state]), 60) == before


def test_crash_between_the_two_table_writes_counts_once() -> None:
    events = _events()
    finished_offset = len(events) - 1
    state, table = _run(events[:-1])
    # The request entry was written for the Finished event, the partition state was not.
    outcome = apply_event(copy.deepcopy(state), table[RID], events[-1], 0, finished_offset, 60)
    assert outcome.request is not None
    table[RID] = outcome.request
    lost_state = state  # the state write never happened
    replayed, _ = _run(events, lost_state, table)
    assert replayed["by_model"]["m1"]["completion_tokens"] == 4
    assert replayed["by_model"]["m1"]["requests"] == 1


def test_second_finished_of_a_rerun_is_not_counted() -> None:
    first = _events(run="r1")
    second = _events(run="r2", t0=1_000_500)
    state, _table = _run(first + second)
    assert state["by_model"]["m1"]["requests"] == 1
    assert state["by_model"]["m1"]["completion_tokens"] == 4


def test_failed_is_counted_once_and_unknown_requests_still_count() -> None:
    state, _ = _run([TokenEvent(RID, "r", 0, 5, Failed("x", "y")), TokenEvent(RID, "r", 0, 6, Failed("x", "y"))])
    assert state["by_model"]["unknown"]["failed"] == 1
    other = "01890a5d-ac96-774b-bcce-b302099a8058"
    state, _ = _run([TokenEvent(other, "r", 9, 5, Finished("stop", Usage(2, 7)))])
    assert state["by_model"]["unknown"]["completion_tokens"] == 7


def test_a_request_ended_by_a_failed_is_not_counted_again_when_a_run_finishes_it() -> None:
    # Found by the chaos run: a submit that timed out is ended with a Failed, the request record is delivered after
    # all and a worker runs it. The log's fold ends it once, failed; analytics counted it failed and finished.
    failed = TokenEvent(RID, "", 0, 999_000, Failed("not_submitted", "the request was not submitted"))
    state, table = _run([failed, *_events()])
    assert state["by_model"]["unknown"]["failed"] == 1
    assert "m1" not in state["by_model"] or state["by_model"]["m1"]["requests"] == 0
    replayed, _ = _run([failed, *_events()], state, table)
    assert replayed["by_model"]["unknown"] == {"requests": 0, "failed": 1, "prompt_tokens": 0, "completion_tokens": 0}


def test_windows_are_bounded_and_merge_across_partitions() -> None:
    states = []
    for p in range(2):
        state = new_partition_state()
        for i in range(aggregate.MAX_WINDOWS + 10):
            rid = f"01890a5d-ac96-774b-bcce-{p:04d}{i:08d}"
            _run(_events(rid=rid, t0=i * 60_000), state, start=i * 10)
        assert len(state["windows"]) == aggregate.MAX_WINDOWS
        states.append(state)
    usage = aggregate.usage_view(merge_states(states), 60)
    assert usage["totals"]["requests"] == 2 * (aggregate.MAX_WINDOWS + 10)
    assert len(usage["windows"]) == aggregate.MAX_WINDOWS
    assert all(w["requests"] == 2 for w in usage["windows"])


@pytest.mark.parametrize("empty", [True, False])
def test_page_renders_charts(empty: bool) -> None:
    state = new_partition_state() if empty else _run(_events())[0]
    merged = merge_states([state])
    html = render(aggregate.usage_view(merged, 60), aggregate.latency_view(merged, 60))
    assert html.startswith("<!doctype html>")
    assert "<svg" in html and "http" not in html.split("<body>")[1].replace('href="usage"', "")
    assert ("no data yet" in html) == empty


def test_combine_reports_of_two_instances_is_the_single_instances_states() -> None:
    states = {
        str(p): {**new_partition_state(), "offset": 10 + p, "by_model": {f"m{p}": {"requests": p}}} for p in range(4)
    }
    a = {"owned": [0, 2], "partitions": {"0": states["0"], "2": states["2"]}}
    b = {"owned": [1, 3], "partitions": {"1": states["1"], "3": states["3"]}}
    assert aggregate.combine_reports([a, b], 4) == states
    assert aggregate.combine_reports([b, a], 4) == states


def test_combine_reports_waits_for_every_partition_and_prefers_the_furthest_state() -> None:
    older, newer = {**new_partition_state(), "offset": 5}, {**new_partition_state(), "offset": 9}
    assert aggregate.combine_reports([{"owned": [0], "partitions": {"0": older}}], 2) is None
    # An owned partition with no events yet has no state; it still counts as covered.
    assert aggregate.combine_reports([{"owned": [0], "partitions": {}}, {"owned": [1], "partitions": {}}], 2) == {}
    both = [{"owned": [0, 1], "partitions": {"1": newer}}, {"owned": [1], "partitions": {"1": older}}]
    assert aggregate.combine_reports(both, 2) == {"1": newer}
    assert aggregate.combine_reports(list(reversed(both)), 2) == {"1": newer}

"""Offset tracking, Delta coalescing, log history folding, synthetic engine, queue metrics."""

from __future__ import annotations

import time

import pytest

from schemas.errors import ConfigError
from schemas.records import Delta, Finished, Started, TokenEvent, TokenLogprob, Usage
from schemas.sampling import SamplingParams
from services.settings import Settings
from workers.engine.types import EngineRequest
from workers.history import Prior, summarize
from workers.intake import OffsetTracker, owned
from workers.main import served_models
from workers.publisher import DeltaCoalescer
from workers.synthetic import SyntheticEngine


def test_offset_tracker_commits_only_contiguous_finished_offsets() -> None:
    tracker = OffsetTracker()
    assert tracker.committable() is None
    for offset in (10, 11, 12):
        tracker.take(offset)
    assert tracker.committable() == 10
    tracker.done(11)
    assert tracker.committable() == 10
    tracker.done(10)
    assert tracker.committable() == 12
    tracker.done(12)
    assert tracker.committable() == 13


def test_a_ticket_of_an_earlier_assignment_is_not_owned_when_its_partition_comes_back() -> None:
    """Revoked, then assigned here again and the same offset read again: only the new assignment's ticket owns it
    (the old one, waiting out a broker outage or a preemption's handover, must neither run nor close it)."""
    first = OffsetTracker()
    first.take(7)
    assert owned(first, first, 7)
    assert not owned(None, first, 7)  # revoked
    again = OffsetTracker()
    again.take(7)
    assert not owned(again, first, 7)
    assert owned(again, again, 7)
    again.done(7)
    assert not owned(again, again, 7)


def test_coalescer_sends_first_token_at_once_and_piles_up_while_behind() -> None:
    c = DeltaCoalescer()
    assert c.add((1,), "a") == [Delta("a", (1,))]
    assert c.add((2,), "b") == []
    assert c.add((3,), "c") == []
    assert c.acked() == [Delta("bc", (2, 3))]
    assert c.acked() == []
    assert c.add((4,), "d") == [Delta("d", (4,))]
    assert c.add((5,), "") == []
    assert c.flush() == [Delta("", (5,))]


def test_coalescer_keeps_choices_and_logprobs_apart() -> None:
    lp = [TokenLogprob(t, -0.5 * t) for t in range(1, 6)]
    c = DeltaCoalescer()
    assert c.add((1,), "a", 0, (lp[0],)) == [Delta("a", (1,), 0, (lp[0],))]
    assert c.add((2,), "b", 1, (lp[1],)) == []
    assert c.add((3,), "c", 0, (lp[2],)) == []
    assert c.add((4,), "d", 1, (lp[3],)) == []
    assert c.acked() == [Delta("bd", (2, 4), 1, (lp[1], lp[3])), Delta("c", (3,), 0, (lp[2],))]


def _ev(run: str, seq: int, payload: object) -> TokenEvent:
    return TokenEvent("r", run, seq, 0, payload)  # type: ignore[arg-type]


def test_history_continues_the_last_run_with_inherited_tokens() -> None:
    events = [
        _ev("a", 0, Started("w1", "m", 3, 0)),
        _ev("a", 1, Delta("he", (1, 2))),
        _ev("a", 2, Delta("l", (3,))),
        _ev("b", 0, Started("w2", "m", 3, 0, continues_run_id="a", continued_tokens=3, continued_text="hel")),
        _ev("b", 1, Delta("lo", (4,))),
    ]
    assert summarize("r", events) == Prior(run_id="b", token_ids=(1, 2, 3, 4), text="hello")
    assert summarize("r", [*events, _ev("b", 2, Finished("length", Usage(3, 4)))]) == Prior(terminal=True)
    # continued at 0 tokens; a run without a token counts as stalled
    assert summarize("r", [_ev("a", 0, Started("w", "m", 3, 0))]) == Prior(run_id="a", stalled_runs=1)
    assert summarize("r", []) == Prior()


def test_history_stops_at_a_gap_and_ignores_the_broken_runs_terminal() -> None:
    events = [
        _ev("a", 0, Started("w1", "m", 3, 0)),
        _ev("a", 1, Delta("he", (1, 2))),
        _ev("a", 3, Delta("lo", (4,))),  # seq 2 never reached the log
        _ev("a", 4, Finished("length", Usage(3, 4))),
    ]
    assert summarize("r", events) == Prior(run_id="a", token_ids=(1, 2), text="he")


def test_synthetic_engine_streams_and_aborts() -> None:
    engine = SyntheticEngine(tokens_per_s=1000.0, max_batch_size=4)
    engine.add(EngineRequest("a", [1], SamplingParams(max_tokens=3)))
    engine.add(EngineRequest("b", [1], SamplingParams(max_tokens=50)))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    reasons: dict[str, str] = {}
    while engine.has_work():
        for out in engine.step():
            seen[out.request_id].extend(out.token_ids)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        if len(seen["b"]) >= 5:
            engine.abort("b")
    assert seen["a"] == [0, 1, 2] and reasons == {"a": "length", "b": "aborted"}


def test_one_worker_serves_one_model_or_several_named_ones_each_on_its_engine() -> None:
    def sources(settings: Settings) -> dict[str, tuple[str, str]]:
        return {name: (spec.engine, spec.source) for name, spec in served_models(settings).items()}

    assert sources(Settings()) == {"default": ("model", "default")}
    assert sources(Settings(model="/m/qwen2-0.5b")) == {"qwen2-0.5b": ("model", "/m/qwen2-0.5b")}
    assert sources(Settings(model="/m/qwen2-0.5b", served_name="qwen")) == {"qwen": ("model", "/m/qwen2-0.5b")}
    assert sources(Settings(model="default=default, small=/m/s")) == {
        "default": ("model", "default"),
        "small": ("model", "/m/s"),
    }
    assert sources(Settings(model="vllm:/m/llama")) == {"llama": ("vllm", "/m/llama")}
    assert sources(Settings(model="/m/llama", engine="vllm")) == {"llama": ("vllm", "/m/llama")}
    assert sources(Settings(model="small=default, big=vllm:/m/llama")) == {
        "small": ("model", "default"),
        "big": ("vllm", "/m/llama"),
    }
    for bad in ("a=/x,/y", "a=/x,a=/y", "dlq=/x,b=/y", "a b=/x,c=/y"):
        with pytest.raises(ConfigError):
            served_models(Settings(model=bad))


def test_queue_metrics_by_model_class_and_tenant() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from workers.metrics import QueueCollector, QueueSample

    collector = QueueCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    now_ms = int(time.time() * 1000)
    samples = (
        QueueSample("m", "batch", "k_a", 3, now_ms - 5_000),
        QueueSample("m", "interactive", "", 1, now_ms),
        QueueSample("m", "batch", None, 40, None),  # read by nobody yet
    )
    collector.add(lambda: samples)
    text = generate_latest(registry).decode()
    assert 'queue_depth{model="m",priority="batch",tenant="k_a"} 3.0' in text
    assert 'queue_unread{model="m",priority="batch"} 40.0' in text
    oldest = next(
        line for line in text.splitlines() if line.startswith('queue_oldest_wait_seconds{model="m",priority="batch"')
    )
    assert 4.9 <= float(oldest.rsplit(" ", 1)[1]) < 60

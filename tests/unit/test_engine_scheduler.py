"""Scheduler: rows join and leave each step, prompts prefill in bounded chunks, the KV budget makes requests wait."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from workers.engine.scheduler import Schedule, Scheduler


@dataclass
class _Seq:
    request_id: str
    prompt_len: int = 4
    reserve: int = 8
    rows: int = 1
    urgent: bool = False


def _ids(seqs: list[Any]) -> list[str]:
    return [s.request_id for s in seqs]


def _chunks(plan: Schedule[Any]) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start, c.length) for c in plan.prefill]


def test_admits_up_to_capacity_and_refills_each_step() -> None:
    sched: Scheduler[Any] = Scheduler(2)
    a, b, c = _Seq("a"), _Seq("b"), _Seq("c")
    for r in (a, b, c):
        sched.add(r)
    first = sched.schedule()
    assert _ids(first.admitted) == ["a", "b"] and _chunks(first) == [("a", 0, 4), ("b", 0, 4)] and not first.decode
    second = sched.schedule()
    assert _ids(second.decode) == ["a", "b"] and not second.prefill and not second.admitted
    sched.finish(a)
    third = sched.schedule()
    assert _ids(third.decode) == ["b"] and _ids(third.admitted) == ["c"]


def test_abort_waiting_and_running() -> None:
    sched: Scheduler[Any] = Scheduler(1)
    sched.add(_Seq("a"))
    sched.add(_Seq("b"))
    sched.schedule()
    assert sched.abort("b") and sched.abort("a") and not sched.abort("zzz")
    plan = sched.schedule()
    assert set(_ids(plan.aborted)) == {"a", "b"} and plan.decode == [] and plan.admitted == []
    assert not sched.has_work()


def test_long_prompt_is_chunked_and_running_rows_keep_decoding() -> None:
    sched: Scheduler[Any] = Scheduler(4, prefill_tokens=10)
    short, long = _Seq("short", prompt_len=3, reserve=10), _Seq("long", prompt_len=25, reserve=40)
    sched.add(short)
    sched.schedule()
    sched.add(long)
    plans = [sched.schedule() for _ in range(3)]
    # Every step decodes the running row and runs at most 10 prompt tokens of the long one.
    assert [_ids(p.decode) for p in plans] == [["short"]] * 3
    assert [_chunks(p) for p in plans] == [[("long", 0, 10)], [("long", 10, 10)], [("long", 20, 5)]]
    assert [c.last for c in plans[2].prefill] == [True]
    assert _ids(sched.schedule().decode) == ["short", "long"]


def test_prefill_budget_counts_padding() -> None:
    sched: Scheduler[Any] = Scheduler(8, prefill_tokens=12)
    for name, n in (("a", 2), ("b", 6), ("c", 2)):
        sched.add(_Seq(name, prompt_len=n, reserve=n + 4))
    plan = sched.schedule()
    # a and b pad to 2 x 6 = 12 tokens; c would make it 3 x 6: it waits for the next step.
    assert _chunks(plan) == [("a", 0, 2), ("b", 0, 6)]
    assert _chunks(sched.schedule()) == [("c", 0, 2)]


def test_kv_budget_makes_requests_wait_and_keeps_order() -> None:
    sched: Scheduler[Any] = Scheduler(8, kv_tokens=100)
    big, small1, small2 = _Seq("big", reserve=50), _Seq("s1", reserve=20), _Seq("s2", reserve=20)
    for r in (big, small1, small2):
        sched.add(r)
    plan = sched.schedule()
    # The cache is one rectangle: 2 rows x 50 fits 100 tokens, a third row would need 150.
    assert _ids(plan.admitted) == ["big", "s1"] and sched.num_waiting == 1
    assert not sched.schedule().admitted
    sched.finish(big)
    assert _ids(sched.schedule().admitted) == ["s2"]


def test_head_of_queue_waits_rather_than_being_overtaken() -> None:
    sched: Scheduler[Any] = Scheduler(8, kv_tokens=100)
    sched.add(_Seq("a", reserve=40))
    sched.schedule()
    sched.add(_Seq("huge", reserve=90))
    sched.add(_Seq("tiny", reserve=5))
    assert not sched.schedule().admitted  # tiny would fit, but huge came first
    assert _ids(list(sched.waiting)) == ["huge", "tiny"]


def test_a_request_alone_always_runs() -> None:
    sched: Scheduler[Any] = Scheduler(2, kv_tokens=10)
    sched.add(_Seq("a", reserve=50))
    assert _ids(sched.schedule().admitted) == ["a"]


@pytest.mark.parametrize("bad", [dict(max_running=0), dict(max_running=1, prefill_tokens=0)])
def test_rejects_zero_limits(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Scheduler(**bad)


def test_kv_reserved_is_the_cache_rectangle_of_the_running_rows() -> None:
    sched: Scheduler[Any] = Scheduler(4, kv_tokens=64)
    assert sched.kv_reserved() == 0
    short, long = _Seq("a", reserve=8), _Seq("b", reserve=20)
    sched.add(short)
    sched.add(long)
    sched.schedule()
    assert sched.kv_reserved() == 2 * 20  # every row is as wide as the widest reservation
    sched.finish(long)
    assert sched.kv_reserved() == 8
    sched.finish(short)
    assert sched.kv_reserved() == 0


def test_an_urgent_prompt_goes_first_and_runs_without_the_batch_decode_rows_at_most_every_other_step() -> None:
    sched: Scheduler[Any] = Scheduler(8)
    batch = [_Seq(f"b{i}") for i in range(3)]
    for seq in batch:
        sched.add(seq)
    sched.schedule()
    assert _ids(sched.schedule().decode) == ["b0", "b1", "b2"]
    late = _Seq("b-late")
    sched.add(late)
    sched.add(_Seq("u1", urgent=True))
    sched.add(_Seq("u2", urgent=True))
    assert _ids(list(sched.waiting)) == ["u1", "u2", "b-late"]  # urgent ones ahead, in their own order
    first = sched.schedule()
    assert _chunks(first) == [("u1", 0, 4), ("u2", 0, 4), ("b-late", 0, 4)] and first.decode == []
    second = sched.schedule()  # the urgent rows decode beside the batch's now
    assert set(_ids(second.decode)) == {"b0", "b1", "b2", "u1", "u2", "b-late"}
    sched.add(_Seq("u3", urgent=True))
    third = sched.schedule()
    assert _chunks(third) == [("u3", 0, 4)] and third.decode == []
    sched.add(_Seq("u4", urgent=True))
    fourth = sched.schedule()  # held the step before: the batch advances now, beside u4's prompt
    assert _chunks(fourth) == [("u4", 0, 4)] and "b0" in _ids(fourth.decode)


def test_urgent_prompts_among_urgent_rows_only_do_not_hold_them() -> None:
    sched: Scheduler[Any] = Scheduler(8)
    sched.add(_Seq("u1", urgent=True))
    sched.schedule()
    sched.add(_Seq("u2", urgent=True))
    plan = sched.schedule()
    assert _ids(plan.decode) == ["u1"] and _chunks(plan) == [("u2", 0, 4)]

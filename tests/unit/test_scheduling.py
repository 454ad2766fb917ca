"""The pure admission scheduler: classes, per-tenant fair share (VTC) with weights, preemption and its churn bound,
deadlines; by order and counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from workers.deferral import Deferred
from workers.fairshare import FairQueue, Waiting
from workers.scheduling import BATCH, INTERACTIVE, RunningView, Scheduler


def waiting(
    key: str, priority: str = BATCH, tenant: str = "a", since: int = 0, deadline: int | None = None
) -> Waiting[str]:
    return Waiting(key, priority, tenant, since, deadline, key)


@dataclass
class Run:
    key: str
    priority: str
    tenant: str
    left: int
    progress: int = 0
    preempted: bool = False


@dataclass
class Sim:
    """Slots that each generate one token per step; the scheduler charges tenants as a worker does."""

    scheduler: Scheduler[str]
    slots: int
    tokens_per_request: int
    running: dict[str, Run] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)  # tokens still to generate, kept across preemptions
    served: Counter[str] = field(default_factory=Counter)
    preempted: Counter[str] = field(default_factory=Counter)
    progress_at_preemption: dict[str, list[int]] = field(default_factory=dict)
    admitted: list[str] = field(default_factory=list)
    steps: int = 0
    tenants: dict[str, str] = field(default_factory=dict)
    priorities: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, priority: str, tenant: str, since: int = 0, length: int = 0) -> None:
        self.tenants[key], self.priorities[key] = tenant, priority
        self.lengths.setdefault(key, length or self.tokens_per_request)
        self.scheduler.push(Waiting(key, priority, tenant, since, None, key, 0.0, self.steps))

    def step(self) -> None:
        views = [RunningView(r.key, r.priority, r.progress, r.left, r.preempted) for r in self.running.values()]
        plan = self.scheduler.plan(self.slots - len(self.running), views, self.steps)
        for key in plan.preempt:
            run = self.running.pop(key)
            self.preempted[key] += 1
            self.progress_at_preemption.setdefault(key, []).append(run.progress)
            self.lengths[key] = run.left
            self.scheduler.push(Waiting(key, run.priority, run.tenant, 0, None, key, 0.0, self.steps), front=True)
        for w in plan.admit:
            self.admitted.append(w.key)
            self.running[w.key] = Run(
                w.key, w.priority, w.tenant, self.lengths[w.key], preempted=w.key in self.preempted
            )
        assert len(self.running) <= self.slots
        for run in list(self.running.values()):
            run.left -= 1
            run.progress += 1
            self.served[run.tenant] += 1
            self.scheduler.charge(run.priority, run.tenant, 1)
            if run.left == 0:
                del self.running[run.key]
        self.steps += 1


def test_interactive_requests_go_before_any_waiting_batch_request() -> None:
    s: Scheduler[str] = Scheduler()
    for i in range(1000):
        s.push(waiting(f"b{i}", BATCH))
    s.push(waiting("i0", INTERACTIVE))
    s.push(waiting("i1", INTERACTIVE))
    assert [w.key for w in s.plan(1, []).admit] == ["i0"]
    assert [w.key for w in s.plan(3, []).admit] == ["i1", "b0", "b1"]


def test_batch_work_only_fills_free_slots() -> None:
    s: Scheduler[str] = Scheduler()
    for i in range(10):
        s.push(waiting(f"b{i}", BATCH))
    assert s.plan(0, []).admit == []
    assert len(s.plan(4, []).admit) == 4
    assert s.depth(BATCH) == 6


def test_preemption_stops_one_progressed_batch_run_per_waiting_interactive_request() -> None:
    s: Scheduler[str] = Scheduler(min_progress=4)
    s.push(waiting("i0", INTERACTIVE))
    s.push(waiting("i1", INTERACTIVE))
    running = [
        RunningView("resumed", BATCH, 3, 500, preempted=True),  # preempted before: protected until 4 new tokens
        RunningView("near-done", BATCH, 50, 2),
        RunningView("long", BATCH, 50, 300),
        RunningView("prefilling", BATCH, 0, 450),  # no token yet: stopped now it would look like a crash
        RunningView("fresh", BATCH, 1, 400),  # never preempted: stopping it costs little
        RunningView("chat", INTERACTIVE, 50, 400),
    ]
    plan = s.plan(0, running)
    assert plan.preempt == ["fresh", "long"]
    assert [w.key for w in plan.admit] == ["i0", "i1"]


def test_no_preemption_when_off_or_when_slots_are_free() -> None:
    running = [RunningView("b", BATCH, 100, 100)]
    off: Scheduler[str] = Scheduler(preemption=False)
    off.push(waiting("i", INTERACTIVE))
    assert off.plan(0, running, step=5).preempt == [] and off.blocked()
    on: Scheduler[str] = Scheduler()
    on.push(waiting("i", INTERACTIVE))
    plan = on.plan(1, running, step=5)
    assert plan.preempt == [] and [w.key for w in plan.admit] == ["i"]


def test_an_interactive_request_waits_the_set_steps_for_a_slot_before_it_preempts() -> None:
    s: Scheduler[str] = Scheduler(after_steps=2)
    s.push(Waiting("i", INTERACTIVE, "", 0, None, "i", since_step=10))
    running = [RunningView("b", BATCH, 50, 100)]
    assert s.plan(0, running, step=11).preempt == []
    assert s.plan(0, running, step=12).preempt == ["b"]


def test_preemption_churn_is_bounded_by_progress() -> None:
    min_progress = 8
    sim = Sim(Scheduler(min_progress=min_progress), slots=4, tokens_per_request=200)
    for i in range(8):
        sim.add(f"b{i}", BATCH, "bulk")
    for step in range(2000):
        if step % 4 == 0:
            sim.add(f"i{step}", INTERACTIVE, "chat", length=6)
        sim.step()
    assert sum(sim.preempted.values()) > 20  # the same runs are preempted again and again, but never too soon
    # the first preemption of a request may come at once; every later one only after min_progress new tokens
    assert all(min(later) >= min_progress for _, *later in sim.progress_at_preemption.values() if later)
    assert all(count <= 1 + 200 // min_progress for count in sim.preempted.values())
    assert sim.served["bulk"] == 8 * 200 and not sim.scheduler.depth(BATCH)  # every batch request ran to its end


def test_two_tenants_with_a_10_to_1_backlog_get_equal_token_shares() -> None:
    sim = Sim(Scheduler(), slots=4, tokens_per_request=16)
    for i in range(400):
        sim.add(f"a{i}", BATCH, "a", since=i)
        if i % 10 == 0:
            sim.add(f"b{i}", BATCH, "b", since=i)
    while any(sim.tenants[w.key] == "b" for w in sim.scheduler.classes[BATCH]):
        sim.step()
    a, b = sim.served["a"], sim.served["b"]
    assert b > 0 and abs(a - b) <= 0.1 * max(a, b), (a, b)


def test_weights_are_honoured() -> None:
    sim = Sim(Scheduler({"gold": 3.0, "plain": 1.0}), slots=4, tokens_per_request=16)
    for i in range(300):
        sim.add(f"g{i}", BATCH, "gold", since=i)
        sim.add(f"p{i}", BATCH, "plain", since=i)
    for _ in range(1000):
        sim.step()
    ratio = sim.served["gold"] / sim.served["plain"]
    assert abs(ratio - 3.0) <= 0.3, ratio


def test_fair_share_holds_inside_the_interactive_class_too() -> None:
    sim = Sim(Scheduler(), slots=2, tokens_per_request=10)
    for i in range(100):
        sim.add(f"x{i}", INTERACTIVE, "x")
    for i in range(10):
        sim.add(f"y{i}", INTERACTIVE, "y")
    for _ in range(100):
        sim.step()
    assert Counter(sim.tenants[k] for k in sim.admitted[:20]) == {"x": 10, "y": 10}


def test_a_returning_tenant_banks_no_credit_for_its_idle_time() -> None:
    q: FairQueue[str] = FairQueue()
    q.push(waiting("a0", tenant="a"))
    assert q.pop() is not None
    q.charge("a", 1000)  # a was served alone for a long time
    for i in range(5):
        q.push(waiting(f"a{i + 1}", tenant="a"))
    q.push(waiting("b0", tenant="b"))  # b arrives: lifted to a's counter, not left at 0
    order = []
    for _ in range(6):
        w = q.pop()
        assert w is not None
        order.append(w.tenant)
        q.charge(w.tenant, 10)
    assert order.count("b") == 1 and order.index("b") <= 1


def test_fifo_inside_a_tenant_and_a_preempted_run_goes_back_first() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(3):
        q.push(waiting(f"a{i}", since=i))
    q.push(waiting("back", since=99), front=True)
    assert [w.key for w in (q.pop(), q.pop(), q.pop(), q.pop()) if w] == ["back", "a0", "a1", "a2"]
    assert q.pop() is None and len(q) == 0


def test_deadlines_end_waiting_requests_once() -> None:
    s: Scheduler[str] = Scheduler()
    s.push(waiting("late", deadline=100))
    s.push(waiting("later", deadline=200))
    s.push(waiting("none"))
    s.push(waiting("admitted", INTERACTIVE, deadline=50))
    assert [w.key for w in s.plan(1, []).admit] == ["admitted"]
    assert s.next_deadline() == 100
    assert s.expired(100) == []
    assert [w.key for w in s.expired(101)] == ["late"]
    assert s.expired(101) == []
    assert s.next_deadline() == 200
    assert [w.key for w in s.expired(10_000)] == ["later"]
    assert s.next_deadline() is None and len(s) == 1


def test_a_request_read_twice_waits_once_and_removal_by_partition() -> None:
    s: Scheduler[str] = Scheduler()
    assert s.push(waiting("r1"))
    assert not s.push(waiting("r1"))
    s.push(waiting("r2", tenant="b"))
    gone = s.remove(lambda w: w.key != "r2")
    assert [w.key for w in gone] == ["r2"] and len(s) == 1 and s.get("r2") is None


def test_stats_per_class_and_tenant() -> None:
    s: Scheduler[str] = Scheduler()
    s.push(waiting("a1", BATCH, "a", since=5))
    s.push(waiting("a2", BATCH, "a", since=3))
    s.push(waiting("b1", INTERACTIVE, "b", since=7))
    stats = {(st.priority, st.tenant): (st.depth, st.oldest_ms) for st in s.stats()}
    assert stats == {(BATCH, "a"): (2, 3), (INTERACTIVE, "b"): (1, 7)}


def test_a_tenant_past_its_share_of_the_look_ahead_is_deferred_in_order_and_read_again_when_low() -> None:
    d: Deferred[int] = Deferred(per_tenant=4, limit=6)
    assert not d.should_defer(BATCH, "a", 3)
    assert d.should_defer(BATCH, "a", 4)
    for offset in range(10, 15):
        d.add(BATCH, "a", offset, since_ms=offset)
    assert d.should_defer(BATCH, "a", 0)  # while any is deferred, later ones follow them: order is kept
    assert not d.should_defer(BATCH, "b", 0) and not d.should_defer(INTERACTIVE, "a", 0)
    assert not d.full(BATCH)
    d.add(BATCH, "b", 99, since_ms=1)
    assert d.full(BATCH) and len(d) == 6
    held = {(BATCH, "a"): 3, (BATCH, "b"): 0}
    assert d.due(lambda p, t: held[(p, t)]) == [(BATCH, "b", 1)]  # a holds 3 > 4 // 2
    held[(BATCH, "a")] = 2
    assert d.due(lambda p, t: held[(p, t)]) == [(BATCH, "a", 2), (BATCH, "b", 1)]
    taken = d.take(BATCH, "a", 2)
    assert [p.where for p in taken] == [10, 11]
    d.restore(BATCH, "a", taken[1:])  # 11 could not be read: it goes back first
    assert [p.where for p in d.take(BATCH, "a", 10)] == [11, 12, 13, 14]
    assert not d.should_defer(BATCH, "a", 0)
    assert d.forget(lambda where: where != 99) == 1 and len(d) == 0
    assert list(d.stats()) == []


def test_a_tenant_that_was_backlogged_all_along_keeps_what_it_is_owed() -> None:
    def owed(arrival: bool) -> list[str]:
        q: FairQueue[str] = FairQueue()
        q.charge("a", 100)  # a was served 100 tokens while b waited
        q.charge("b", 20)
        for i in range(5):
            q.push(waiting(f"a{i}", tenant="a"))
        q.push(waiting("b0", tenant="b"), arrival=arrival)
        q.push(waiting("b1", tenant="b"))
        order = []
        while (w := q.pop()) is not None:
            order.append(w.tenant)
            q.charge(w.tenant, 10)
        return order

    # read again (deferred all along): b is owed 80 tokens and goes first until it has them
    assert owed(arrival=False)[:2] == ["b", "b"]
    # a true arrival is lifted to the lowest waiting counter: no credit for time it did not wait
    assert owed(arrival=True)[:2] == ["a", "b"]

"""Classes, preemption and fair share on a real broker: by admission order and token counts, never by time."""

from __future__ import annotations

import asyncio
import dataclasses
import operator
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from schemas.ids import new_request_id
from schemas.records import Failed, Finished, InferenceRequest
from schemas.sampling import SamplingParams
from services.settings import Settings
from tests.integration.worker_helpers import client_view, collect_records, describe, produce, running_worker
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest, StepOutput
from workers.fairshare import Waiting
from workers.ledger import Active, Ticket
from workers.main import Worker
from workers.scheduling import BATCH, INTERACTIVE, Plan, RunningView
from workers.served_model import ServedModel
from workers.synthetic import SyntheticEngine

pytestmark = pytest.mark.integration

SLOTS = 4
MIN_PROGRESS = 4


@dataclasses.dataclass
class Trace:
    """What one served model's scheduler did, in order: ("queued" | "admitted" | "preempted", request id)."""

    steps: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    plans: list[Plan[Ticket]] = dataclasses.field(default_factory=list)

    def index(self, what: str, key: str) -> int:
        return self.steps.index((what, key))


def trace(served: ServedModel) -> Trace:
    """Record what the scheduler of ``served`` is told and decides (its logic is untouched)."""
    out = Trace()
    scheduler = served.scheduler
    push, plan = scheduler.push, scheduler.plan

    def pushed(waiting: Waiting[Ticket], *, front: bool = False, arrival: bool = True) -> bool:
        ok = push(waiting, front=front, arrival=arrival)
        if ok:
            out.steps.append(("queued", waiting.key))
        return ok

    def planned(free: int, running: Sequence[RunningView], step: int = 0) -> Plan[Ticket]:
        result = plan(free, running, step)
        out.steps += [("preempted", key) for key in result.preempt]
        out.steps += [("admitted", w.key) for w in result.admit]
        if result.admit or result.preempt:
            out.plans.append(result)
        return result

    scheduler.push = pushed  # type: ignore[method-assign]
    scheduler.plan = planned  # type: ignore[method-assign]
    return out


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    """The root conftest's engine with SLOTS rows: few enough slots that a backlog fills them."""
    return Engine.load(str(tiny_model_dir), device="cpu", max_batch_size=SLOTS)


def base_settings(kafka_bootstrap: str, topic_prefix: str, **overrides: Any) -> Settings:
    return Settings.from_env(
        {},
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        requests_partitions=2,
        events_partitions=2,
        worker_metrics_port=0,
        max_batch_size=SLOTS,
        max_tokens_limit=256,
        preempt_min_tokens=MIN_PROGRESS,
        **overrides,
    )


def preemptible_for_a_while(active: Active) -> bool:
    """A batch run that may be preempted and will not end (freeing its slot) for 30 steps or more."""
    left = active.ticket.request.max_tokens - active.completion
    return active.in_engine and active.ticket.priority == BATCH and active.progress >= MIN_PROGRESS and left >= 30


async def test_interactive_goes_first_and_preempts_batch_runs_that_continue_exactly(
    kafka_bootstrap: str, topic_prefix: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = base_settings(kafka_bootstrap, topic_prefix)
    step = engine.step

    def slow_step() -> list[StepOutput]:
        time.sleep(0.01)  # a few seconds per batch run on any machine, so interactive requests find them running
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(engine, "eos_ids", frozenset())  # the random tiny model must not end its generations early
    batch = [
        InferenceRequest(new_request_id(), f"bulk job {i} of the night", 120, temperature=0.0, priority=BATCH)
        for i in range(6 * SLOTS)  # a backlog of six times the batch capacity
    ]
    chats = [InferenceRequest(new_request_id(), f"hello there {i}", 8, temperature=0.0) for i in range(3)]
    async with running_worker(settings, engine) as worker:
        served = worker.models[settings.served_model]
        log = trace(served)
        await produce(settings, batch)
        for chat in chats:
            # every slot runs batch work that may be preempted: the chat must stop one to get in
            await until(
                lambda: sum(preemptible_for_a_while(a) for a in served.core.ledger) == SLOTS,
                "every slot running a preemptible batch run, none about to end",
            )
            waiting_batch = {w.key for w in served.scheduler.classes[BATCH]}
            assert waiting_batch, "the batch backlog ran out before the chat"
            await produce(settings, [chat])
            await until(partial(operator.contains, log.steps, ("admitted", chat.request_id)), "the chat admitted")
            queued, admitted = log.index("queued", chat.request_id), log.index("admitted", chat.request_id)
            between = [key for what, key in log.steps[queued:admitted] if what == "admitted"]
            assert not set(between) & waiting_batch, "a batch request that waited went before the chat"
            assert any(what == "preempted" for what, _ in log.steps[queued:admitted])
        ids = [r.request_id for r in [*batch, *chats]]
        records = await collect_records(settings, ids, timeout_s=300)
    preemptions = [key for what, key in log.steps if what == "preempted"]
    assert len(preemptions) >= len(chats)  # a run may be preempted again once it made progress anew
    preempted = set(preemptions)
    direct = engine.generate(
        [
            EngineRequest(r.request_id, engine.encode_prompt(r.prompt), SamplingParams(r.max_tokens, temperature=0))
            for r in [*batch, *chats]
        ]
    )
    lost = duplicated = 0
    for r in [*batch, *chats]:
        events = [ev for _, ev in records[r.request_id]]
        assert sum(ev.is_terminal for ev in events) == 1, "\n".join(describe(ev) for ev in events)
        view = client_view(r.request_id, records[r.request_id])
        assert view.terminals == ["done"] and view.restarts == 0, r.request_id
        expected_ids, expected_text, _ = direct[r.request_id]
        common = 0
        while common < min(len(expected_ids), len(view.token_ids)) and expected_ids[common] == view.token_ids[common]:
            common += 1
        lost += len(expected_ids) - common
        duplicated += len(view.token_ids) - common
        assert view.text == expected_text, r.request_id
        finished = events[-1].payload
        assert isinstance(finished, Finished) and finished.usage.completion_tokens == len(expected_ids)
        if r.request_id in preempted:
            assert view.seamless >= 1  # continued by a later run, invisibly to its client
    print(f"\npreemption: {len(preemptions)} preemptions of {len(preempted)} runs; lost={lost} duplicated={duplicated}")
    assert lost == duplicated == 0


async def shares_while_both_backlogged(
    worker: Worker, settings: Settings, requests: list[InferenceRequest], tenants: tuple[str, str]
) -> Counter[str]:
    """Tokens each tenant was served while both had requests waiting in the look-ahead."""
    served = worker.models[settings.served_model]
    tokens: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    total = Counter(r.tenant for r in requests)
    on_tokens, push = served.core.on_tokens, served.scheduler.push

    def both_waiting() -> bool:
        waiting = Counter(w.tenant for w in served.scheduler.classes[BATCH])
        waiting.update({tenant: count for _, tenant, count, _ in served.deferred.stats()})
        return all(waiting[t] > 0 for t in tenants)

    def counted(ticket: Ticket, n: int) -> None:
        if both_waiting():
            tokens[ticket.request.tenant] += n
        on_tokens(ticket, n)

    def pushed(waiting: Waiting[Ticket], *, front: bool = False, arrival: bool = True) -> bool:
        ok = push(waiting, front=front, arrival=arrival)
        seen[waiting.tenant] += ok and not front
        return ok

    served.core.on_tokens = counted
    served.scheduler.push = pushed  # type: ignore[method-assign]
    await produce(settings, requests)
    await until(lambda: seen == total, "every request read", 120)
    await until(lambda: not both_waiting(), "one tenant's backlog served", 300)
    await collect_records(settings, [r.request_id for r in requests], timeout_s=300)
    return tokens


def backlog(tenant: str, count: int, max_tokens: int = 16) -> list[InferenceRequest]:
    return [
        InferenceRequest(new_request_id(), f"job {i}", max_tokens, priority=BATCH, tenant=tenant) for i in range(count)
    ]


def interleaved(*backlogs: list[InferenceRequest]) -> list[InferenceRequest]:
    """The backlogs' requests as concurrent producers would write them, in proportion."""
    longest = max(len(b) for b in backlogs)
    keyed = [(i * longest / len(b), i, r) for b in backlogs for i, r in enumerate(b)]
    return [r for _, _, r in sorted(keyed, key=lambda k: (k[0], k[1]))]


async def test_two_tenants_with_a_10_to_1_backlog_get_equal_token_shares(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = base_settings(kafka_bootstrap, topic_prefix, engine="synthetic", synthetic_tokens_per_s=400.0)
    engine = SyntheticEngine(settings.synthetic_tokens_per_s, SLOTS)
    engine.name = settings.served_model
    requests = interleaved(backlog("big", 400), backlog("small", 40))
    async with running_worker(settings, engine) as worker:
        tokens = await shares_while_both_backlogged(worker, settings, requests, ("big", "small"))
    big, small = tokens["big"], tokens["small"]
    print(f"\nfair share 10:1 backlog: tokens while both backlogged big={big} small={small}")
    assert small >= 16 * 10 and abs(big - small) <= 0.1 * max(big, small), tokens


async def test_a_tenant_behind_another_tenants_backlog_deeper_than_the_look_ahead_gets_its_share(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = base_settings(
        kafka_bootstrap,
        topic_prefix,
        engine="synthetic",
        synthetic_tokens_per_s=400.0,
        scheduler_lookahead=64,
        scheduler_tenant_lookahead=16,
    )
    engine = SyntheticEngine(settings.synthetic_tokens_per_s, SLOTS)
    engine.name = settings.served_model
    # all of "first" is ahead of "behind" in the log; A's runs that started before B arrived count in A's share
    requests = [*backlog("first", 800), *backlog("behind", 80)]
    async with running_worker(settings, engine) as worker:
        served = worker.models[settings.served_model]
        held: list[int] = []
        sample = served._sample

        def sampled() -> None:
            held.append(len(served.scheduler))
            sample()

        served._sample = sampled  # type: ignore[method-assign]
        tokens = await shares_while_both_backlogged(worker, settings, requests, ("first", "behind"))
    first, behind = tokens["first"], tokens["behind"]
    print(f"\nbacklog 10x deeper than the look-ahead: tokens while both backlogged first={first} behind={behind}")
    assert behind >= 16 * 40 and abs(first - behind) <= 0.1 * max(first, behind), tokens
    assert max(held) <= 2 * 16 + SLOTS  # the look-ahead stayed bounded: the rest were positions only


async def test_weights_are_honoured(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = base_settings(
        kafka_bootstrap, topic_prefix, engine="synthetic", synthetic_tokens_per_s=400.0, tenant_weights=("gold=3",)
    )
    engine = SyntheticEngine(settings.synthetic_tokens_per_s, SLOTS)
    engine.name = settings.served_model
    requests = interleaved(backlog("gold", 200), backlog("plain", 200))
    async with running_worker(settings, engine) as worker:
        tokens = await shares_while_both_backlogged(worker, settings, requests, ("gold", "plain"))
    ratio = tokens["gold"] / tokens["plain"]
    print(f"\nweights gold=3 plain=1: tokens while both backlogged {dict(tokens)}, ratio {ratio:.2f}")
    assert abs(ratio - 3.0) <= 0.3, tokens


async def test_a_deadline_that_passes_in_the_look_ahead_ends_the_request_once_and_a_cancel_needs_no_slot(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = base_settings(kafka_bootstrap, topic_prefix, engine="synthetic", synthetic_tokens_per_s=20.0)
    engine = SyntheticEngine(settings.synthetic_tokens_per_s, SLOTS)
    engine.name = settings.served_model
    hogs = backlog("bulk", SLOTS, max_tokens=200)  # hold every slot for ten seconds
    now_ms = int(time.time() * 1000)
    late = [
        InferenceRequest(new_request_id(), "soon", 4, priority=BATCH, deadline_ms=now_ms + 2_000 + i) for i in range(3)
    ]
    async with running_worker(settings, engine) as worker:
        served = worker.models[settings.served_model]
        log = trace(served)
        await produce(settings, hogs)
        await until(lambda: len(served.core.ledger) == SLOTS, "every slot busy")
        gone = InferenceRequest(new_request_id(), "never mind", 4, priority=BATCH)
        served.cancel(gone.request_id)  # cancelled before a worker read it
        await produce(settings, [*late, gone])
        records = await collect_records(settings, [r.request_id for r in [*late, gone]], timeout_s=60)
        ended = [ev.payload for _, ev in records[gone.request_id]]
        assert isinstance(ended[-1], Finished) and ended[-1].finish_reason == "cancelled"
        assert ("admitted", gone.request_id) not in log.steps and ("queued", gone.request_id) not in log.steps
        for r in late:
            events = [ev for _, ev in records[r.request_id]]
            assert [type(ev.payload) for ev in events] == [Failed], events
            failed = events[0].payload
            assert isinstance(failed, Failed) and failed.code == "deadline_exceeded"
            assert ("admitted", r.request_id) not in log.steps  # it never took a slot
        for hog in hogs:
            served.cancel(hog.request_id)
        await collect_records(settings, [r.request_id for r in hogs], timeout_s=60)


async def test_a_batch_backlog_far_past_the_look_ahead_never_holds_back_an_interactive_request(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    lookahead = 8
    settings = base_settings(
        kafka_bootstrap, topic_prefix, engine="synthetic", synthetic_tokens_per_s=20.0, scheduler_lookahead=lookahead
    )
    engine = SyntheticEngine(settings.synthetic_tokens_per_s, SLOTS)
    engine.name = settings.served_model
    # ten seconds a run: the backlog stays put; its records say "interactive", but the topic decides the class
    flood = [dataclasses.replace(r, priority=INTERACTIVE) for r in backlog("bulk", 25 * lookahead, max_tokens=200)]
    chat = InferenceRequest(new_request_id(), "hello", 2)
    async with running_worker(settings, engine) as worker:
        served = worker.models[settings.served_model]
        log = trace(served)
        await produce(settings, flood, settings.requests_topic_for(settings.served_model, BATCH))
        await until(lambda: len(served.core.ledger) == SLOTS, "every slot running batch work")
        assert {a.ticket.priority for a in served.core.ledger} == {BATCH}
        await until(lambda: served.scheduler.depth(BATCH) >= lookahead, "the batch look-ahead full")
        assert served.scheduler.depth(BATCH) < 2 * lookahead  # bounded: the rest stays in Kafka
        await produce(settings, [chat])
        records = await collect_records(settings, [chat.request_id], timeout_s=60)
        admitted = [key for what, key in log.steps if what == "admitted"]
        assert admitted.index(chat.request_id) == SLOTS  # right after the batch runs it found, before any other
        assert [type(ev.payload).__name__ for _, ev in records[chat.request_id]][-1] == "Finished"
        for request in flood:  # the backlog ends at once, read or not
            served.cancel(request.request_id)
        await collect_records(settings, [r.request_id for r in flood], timeout_s=120)

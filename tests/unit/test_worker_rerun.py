"""The worker's core without Kafka: a re-taken request never mixes with its abandoned run; refusals end requests."""

from __future__ import annotations

import asyncio
import time

import pytest

from schemas.errors import TokenRelayError
from schemas.ids import new_request_id
from schemas.records import ChatMessage, Delta, Failed, Finished, InferenceRequest, Started, TokenEvent
from schemas.sampling import SamplingParams
from services.kafka import Headers
from services.settings import Settings
from workers.admission import Admission, Limits, Refusal
from workers.control import CancelledIds
from workers.core import ModelCore
from workers.dispatch import Dispatcher
from workers.engine.engine import Engine
from workers.engine.port import StepLoopPort
from workers.engine.types import EngineRequest
from workers.history import Prior, summarize
from workers.ledger import Ticket
from workers.scheduling import Scheduler

MAX_TOKENS = 12


class Recorder:
    """An event sink that acknowledges everything at once, or fails the runs it is told to."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.fail_seq: dict[str, int] = {}

    def publish(self, event: TokenEvent, headers: Headers | None = None) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_seq.get(event.request_id) == event.seq:
            done.set_exception(ConnectionError("broker gone"))
        else:
            self.events.append(event)
            done.set_result(None)
        return done


def _core(engine: Engine, sink: Recorder, **limits: object) -> tuple[ModelCore, StepLoopPort]:
    values: dict[str, object] = {
        "model": "default",
        "context_length": engine.max_positions,
        "max_prompt_tokens": 1024,
        "max_tokens_limit": 1024,
        "has_chat_template": engine.has_chat_template,
        "max_stalled_runs": 3,
    }
    values.update(limits)
    port = StepLoopPort(engine)
    return ModelCore(port, Limits(**values), sink, "w-1", CancelledIds()), port  # type: ignore[arg-type]


async def _settle() -> None:
    """Let done-callbacks of already-resolved futures and the run streams run (each takes a loop iteration)."""
    for _ in range(6):
        await asyncio.sleep(0)


async def _take(core: ModelCore, request: InferenceRequest, prior: Prior | None = None) -> Refusal | Admission:
    ticket = Ticket(request, request.request_id, 0)
    decision, prompt_ids = core.decide(ticket, prior or Prior())
    if isinstance(decision, Refusal):
        core.refuse(ticket, decision.failed)
    else:
        core.run(ticket, decision, prompt_ids, prior or Prior())
    await _settle()
    return decision


async def _step(port: StepLoopPort) -> None:
    """One iteration of the port's step loop, driven by the test: feed, step, hand out the outputs."""
    port.feed()
    port.dispatch(port.engine.step())
    await _settle()


async def test_abandoned_run_never_feeds_or_cancels_the_new_run_of_the_same_request(engine: Engine) -> None:
    sink = Recorder()
    core, port = _core(engine, sink)
    closed: list[str] = []
    core.on_closed = lambda ticket: closed.append(ticket.request.request_id)
    request = InferenceRequest(new_request_id(), "The quick brown fox", MAX_TOKENS, temperature=0.0)
    (expected, expected_text, _) = engine.generate(
        [EngineRequest("direct", engine.encode_prompt(request.prompt), SamplingParams(MAX_TOKENS, 0.0))]
    )["direct"]

    await _take(core, request)
    old = core.ledger.get(request.request_id)
    assert old is not None and old.in_engine
    for _ in range(3):  # the old run streams a few tokens
        await _step(port)
    # Its partition is revoked (the run is abandoned, its abort queued) and assigned back: the record is taken
    # again, with nothing in the log to continue from, before the engine has processed the abort.
    core.abandon(lambda ticket: True)
    await _take(core, request)
    new = core.ledger.get(request.request_id)
    assert new is not None and new.run_id != old.run_id
    port.feed()
    while engine.has_work():
        await _step(port)

    events = [e for e in sink.events if e.run_id == new.run_id]
    terminal = [e.payload for e in events if e.is_terminal]
    assert len(terminal) == 1 and isinstance(terminal[0], Finished), terminal
    assert terminal[0].usage.completion_tokens == len(expected)
    deltas = [e.payload for e in events if isinstance(e.payload, Delta)]
    assert [t for d in deltas for t in d.token_ids] == expected
    assert "".join(d.text for d in deltas) == expected_text
    assert core.ledger.runs == 0 and len(core.ledger) == 0
    assert closed == [request.request_id]


@pytest.mark.parametrize(
    ("request_fields", "limits", "code"),
    [
        ({"max_tokens": 0}, {}, "max_tokens_invalid"),
        ({"temperature": 9.0}, {}, "temperature_invalid"),
        ({"deadline_ms": 1}, {}, "deadline_exceeded"),
        ({"messages": (ChatMessage("user", "hi"),)}, {"has_chat_template": False}, "chat_template_missing"),
        ({"prompt": "a b c d e f g h"}, {"max_prompt_tokens": 3}, "prompt_too_long"),
        ({"max_tokens": 100}, {"context_length": 50}, "context_length_exceeded"),
    ],
)
async def test_refusals_end_the_request_with_one_failed_and_no_started(
    engine: Engine, request_fields: dict[str, object], limits: dict[str, object], code: str
) -> None:
    sink = Recorder()
    core, _ = _core(engine, sink, **limits)
    closed: list[str] = []
    core.on_closed = lambda ticket: closed.append(ticket.request.request_id)
    fields: dict[str, object] = {"request_id": new_request_id(), "prompt": "hello", "max_tokens": 8}
    fields.update(request_fields)
    request = InferenceRequest(**fields)  # type: ignore[arg-type]
    decision = await _take(core, request)
    assert isinstance(decision, Refusal)
    assert [type(e.payload) for e in sink.events] == [Failed]
    payload = sink.events[0].payload
    assert isinstance(payload, Failed) and payload.code == code and sink.events[0].seq == 0
    assert closed == [request.request_id]


async def test_a_prompt_that_breaks_the_tokenizer_fails_the_request_not_the_worker(engine: Engine) -> None:
    sink = Recorder()
    core, _ = _core(engine, sink, has_chat_template=True)  # claims a template the tokenizer does not have
    request = InferenceRequest(new_request_id(), "", 8, messages=(ChatMessage("user", "hi"),))
    decision = await _take(core, request)
    assert isinstance(decision, Refusal) and decision.failed.code == "internal"
    assert "Traceback" not in decision.failed.message and "template" not in decision.failed.message


async def test_a_request_that_stalled_its_workers_goes_to_the_dlq_and_one_that_stalled_once_runs_alone(
    engine: Engine,
) -> None:
    core, _ = _core(engine, Recorder())
    request = InferenceRequest(new_request_id(), "hello", 4, temperature=0.0)
    dead = await _take(core, request, Prior(run_id="r3", stalled_runs=3))
    assert isinstance(dead, Refusal) and dead.dead_letter and dead.failed.code == "worker_crashed"
    suspect = await _take(core, InferenceRequest(new_request_id(), "hello", 4), Prior(run_id="r1", stalled_runs=1))
    assert isinstance(suspect, Admission) and suspect.solo and core.solo is not None


async def test_a_lost_event_stops_the_run_and_asks_for_a_retake_without_a_terminal(engine: Engine) -> None:
    sink = Recorder()
    core, port = _core(engine, sink)
    retaken: list[str] = []
    core.on_retake = lambda ticket: retaken.append(ticket.request.request_id)
    request = InferenceRequest(new_request_id(), "The quick brown fox", 30, temperature=0.0)
    sink.fail_seq[request.request_id] = 2  # the second Delta never reaches the log
    await _take(core, request)
    port.feed()
    while engine.has_work():
        await _step(port)
    assert retaken == [request.request_id]
    seqs = [e.seq for e in sink.events if e.request_id == request.request_id]
    assert seqs == [0, 1], seqs  # nothing published past the lost event, and no terminal
    assert isinstance(sink.events[0].payload, Started)
    assert len(core.ledger) == 0


async def test_a_deadline_that_passes_mid_run_aborts_it_at_the_next_step_with_one_failed(engine: Engine) -> None:
    sink = Recorder()
    core, port = _core(engine, sink)
    deadline_passed = asyncio.Event()
    request = InferenceRequest(
        new_request_id(), "The quick brown fox", 40, temperature=0.0, deadline_ms=int(time.time() * 1000) + 200
    )
    await _take(core, request)
    await _step(port)  # the run streams before its deadline
    assert any(isinstance(e.payload, Delta) for e in sink.events)
    asyncio.get_running_loop().call_at(core_deadline(request), deadline_passed.set)
    await asyncio.wait_for(deadline_passed.wait(), 5)
    await _settle()
    for _ in range(2):  # the abort reaches the engine at its next step, which ends the run
        await _step(port)
    terminal = [e.payload for e in sink.events if e.is_terminal]
    assert len(terminal) == 1 and isinstance(terminal[0], Failed), terminal
    assert terminal[0].code == "deadline_exceeded"
    assert len(core.ledger) == 0 and not engine.has_work()


def core_deadline(request: InferenceRequest) -> float:
    """The loop time at which the request's deadline has passed (its timer fires then)."""
    assert request.deadline_ms is not None
    return asyncio.get_running_loop().time() + max(0.0, request.deadline_ms / 1000 - time.time()) + 0.05


async def test_a_preempted_run_hands_over_exactly_what_the_log_holds(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "eos_ids", frozenset())  # all MAX_TOKENS tokens, whatever the random tiny model says
    sink = Recorder()
    core, port = _core(engine, sink)
    request = InferenceRequest(new_request_id(), "The quick brown fox", MAX_TOKENS, temperature=0.0)
    rid = request.request_id
    (expected, expected_text, _) = engine.generate(
        [EngineRequest("direct", engine.encode_prompt(request.prompt), SamplingParams(MAX_TOKENS, 0.0))]
    )["direct"]
    await _take(core, request)
    port.feed()
    for _ in range(4):
        port.dispatch(engine.step())
    await asyncio.sleep(0)  # the run takes the four steps at once: later tokens pile up unsent behind the first Delta
    running = core.ledger.get(rid)
    assert running is not None and running.progress >= 2
    handover = core.preempt(rid)
    assert handover is not None and core.ledger.get(rid) is None
    await _settle()
    assert handover.last is not None and handover.last.done() and handover.last.exception() is None
    assert not any(e.is_terminal for e in sink.events)
    assert summarize(rid, sink.events) == handover.prior  # what a worker reading the log would continue from
    assert 2 <= len(handover.prior.token_ids) < len(expected) == MAX_TOKENS
    await _step(port)  # the engine drops the stopped run at its next step
    await _take(core, request, handover.prior)
    await _step(port)
    while engine.has_work():
        await _step(port)
    terminal = [e.payload for e in sink.events if e.is_terminal]
    assert len(terminal) == 1 and isinstance(terminal[0], Finished)
    assert terminal[0].usage.completion_tokens == len(expected)
    continued = summarize(rid, [e for e in sink.events if not e.is_terminal])
    assert list(continued.token_ids) == expected and continued.text == expected_text


async def test_each_engine_step_counts_once_and_wakes_the_dispatcher_when_asked(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "eos_ids", frozenset())  # every run lasts MAX_TOKENS steps
    sink = Recorder()
    core, port = _core(engine, sink)
    core.wake_each_step = True
    for _ in range(3):
        await _take(core, InferenceRequest(new_request_id(), "The quick brown fox", MAX_TOKENS, temperature=0.0))
    port.feed()
    for step in range(1, 4):  # three runs get an output at each step: one step counted, one wake
        core.changed.clear()
        port.dispatch(engine.step())
        await _settle()
        assert core.steps == step and core.changed.is_set()
    core.wake_each_step = False
    core.changed.clear()
    port.dispatch(engine.step())
    await _settle()
    assert core.steps == 4 and not core.changed.is_set()
    while engine.has_work():
        await _step(port)
    assert len([e for e in sink.events if e.is_terminal]) == 3


class Holding:
    """The dispatcher's intake: owns every ticket until ``revoke``; the log holds ``priors`` (else nothing)."""

    def __init__(self, priors: dict[str, Prior]) -> None:
        self.priors = priors
        self.revoked = False

    def owns(self, ticket: Ticket) -> bool:
        return not self.revoked

    async def prior(self, ticket: Ticket) -> Prior | None:
        return self.priors.get(ticket.request.request_id, Prior())

    async def dead_letter(self, record: object, error: TokenRelayError) -> None:
        raise AssertionError("nothing here goes to the DLQ")

    def admitted(self) -> None:
        pass


async def test_a_suspect_request_waiting_to_run_alone_does_not_start_once_its_partition_is_revoked(
    engine: Engine,
) -> None:
    """A request that stalled a worker before waits for the ledger to empty; a revocation empties it (its runs are
    abandoned), and the waiting request, no longer this worker's, must not start a run nobody would stop."""
    sink = Recorder()
    core, _ = _core(engine, sink)
    running = InferenceRequest(new_request_id(), "The quick brown fox", MAX_TOKENS, temperature=0.0)
    suspect = InferenceRequest(new_request_id(), "hello", 4)
    intake = Holding({suspect.request_id: Prior(run_id="r1", stalled_runs=1)})
    dispatcher = Dispatcher(Settings.from_env({}), core, Scheduler(), intake)
    await _take(core, running)
    dispatcher.admit_soon(Ticket(suspect, suspect.request_id, 0, check_log=True))
    await _settle()
    assert dispatcher._solo_waiting == 1 and not [e for e in sink.events if e.request_id == suspect.request_id]
    intake.revoked = True
    core.abandon(lambda ticket: True)  # what the revocation does to the running request
    await _settle()
    assert dispatcher._solo_waiting == 0 and len(core.ledger) == 0
    assert not [e for e in sink.events if e.request_id == suspect.request_id]
    dispatcher.stop()

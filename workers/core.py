"""One served model's requests between intake and engine: admission, runs, engine loop, terminal events; no Kafka."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from schemas.errors import EngineRefused
from schemas.records import PRIORITIES, Accepted, Failed, Finished, InferenceRequest, TokenEvent, Usage
from schemas.structured import calls_tools, tool_names
from schemas.toolcalls import openai_calls, split_calls
from services import tracing
from services.kafka import record_headers
from workers import metrics
from workers.admission import Admission, Limits, Refusal, admit, precheck, sampling_of
from workers.control import CancelledIds
from workers.engine.port import EnginePort
from workers.engine.types import EngineRequest, StepOutput
from workers.history import Prior
from workers.ledger import Active, Ledger, Ticket
from workers.publisher import EventSink, RunStream
from workers.spans import RunSpans, queue_start_ns

log = logging.getLogger(__name__)

INTERNAL = "the worker failed while {} this request"
INTERACTIVE = PRIORITIES[0]


@dataclass(frozen=True, slots=True)
class Handover:
    """A preempted run: its ticket, the acknowledgement of its last event, and what the log holds of the request
    once that acknowledgement arrives (what a worker reading the log after a death would find)."""

    ticket: Ticket
    last: asyncio.Future[None] | None
    prior: Prior


def owner_record(request: InferenceRequest, now_ms: int) -> TokenEvent | None:
    """The Accepted a refusal writes before its Failed, for a request with a tenant.

    A request produced straight to Kafka has no gateway's Accepted, and a Failed before any Started names no tenant:
    without this its own tenant could not read its failure. After a gateway's Accepted it is ignored by every reader.
    """
    if not request.tenant:
        return None
    return TokenEvent(request.request_id, "", 0, now_ms, Accepted(request.model, request.tenant, request.deadline_ms))


def _quietly(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved: a lost Accepted only costs the tenant its read of the failure


class ModelCore:
    """Runs the requests of one engine and ends each with exactly one terminal event.

    The intake hands it tickets (a request and where it came from) with what the log already holds; the core calls
    ``on_closed(ticket)`` once the request's terminal event is acknowledged, and ``on_retake(ticket)`` when a run
    broke (an event was lost): the request must then be taken up again from the log. An exception while preparing
    or running a request fails that request, never the worker.
    """

    def __init__(
        self,
        engine: EnginePort,
        limits: Limits,
        publisher: EventSink,
        worker_id: str,
        cancelled: CancelledIds,
    ):
        self.engine = engine
        self.limits = limits
        self.publisher = publisher
        self.worker_id = worker_id
        self.cancelled = cancelled
        # Installed by the intake (ServedModel): a request ended, or must be taken up again from the log.
        self.on_closed: Callable[[Ticket], None] = _ignore
        self.on_retake: Callable[[Ticket], None] = _ignore
        self.on_tokens: Callable[[Ticket, int], None] = _ignore_tokens  # a run generated tokens (fair share)
        self.ledger = Ledger()
        self.solo: Active | None = None  # a suspect request running alone until its first token
        self.changed = asyncio.Event()  # set whenever a request leaves the ledger or the solo one makes progress
        self.steps = 0  # engine steps done (as the runs see them: a turn of the loop in which runs got outputs)
        self.wake_each_step = False  # set ``changed`` after every step too (the dispatcher waits on a step)
        self._step_pending = False
        self._streams: set[asyncio.Task[None]] = set()
        self._expired: set[str] = set()  # runs aborted because their request's deadline passed

    # Admission ---------------------------------------------------------------------------------------------

    def decide(self, ticket: Ticket, prior: Prior) -> tuple[Refusal | Admission, list[int]]:
        """Refuse the request, or admit it with its prompt's token ids."""
        request = ticket.request
        refusal = precheck(request, prior, self.limits, _now_ms())
        if refusal is not None:
            return refusal, []
        try:
            tools = request.tools if calls_tools(request.tools, request.tool_choice) else None
            prompt_ids = self.engine.encode_prompt(request.prompt, request.messages, tools)
            self.engine.prepare(sampling_of(request))
        except EngineRefused as exc:
            return Refusal(Failed(exc.code, exc.message)), []
        except Exception:
            log.exception("request %s: preparing the prompt failed", request.request_id)
            return Refusal(Failed("internal", INTERNAL.format("preparing"))), []
        decision = admit(
            request,
            len(prompt_ids),
            prior,
            self.limits,
            worker=self.worker_id,
            created_ms=ticket.created_ms,
            now_ms=_now_ms(),
        )
        return decision, prompt_ids

    def refuse(self, ticket: Ticket, failed: Failed) -> None:
        """End the request with ``failed`` before any Started."""
        log.info("request %s: refused: %s (%s)", ticket.request.request_id, failed.code, failed.message)
        stream = self._stream(ticket)
        if tracing.enabled():
            spans = self._spans(ticket, stream.run_id, 0, Prior(), refused=failed.code)
            stream.headers = record_headers("TokenEvent", spans.trace)
        owner = owner_record(ticket.request, _now_ms())
        if owner is not None:  # best effort: the Failed is what matters
            self.publisher.publish(owner, stream.headers).add_done_callback(_quietly)
        self._close_when_acked(ticket, stream.finish(failed), None, None)

    def run(self, ticket: Ticket, admission: Admission, prompt_ids: list[int], prior: Prior) -> None:
        """Start a run; the engine gets it once its Started is acknowledged (a crash then counts against it)."""
        request = ticket.request
        rid = request.request_id
        stream = self._stream(ticket)
        active = Active(
            ticket,
            stream,
            len(prompt_ids),
            len(prior.token_ids),
            solo=admission.solo,
            continued_ids=prior.token_ids,
            continued_text=prior.text,
            text=prior.text,
        )
        if tracing.enabled():
            active.spans = self._spans(ticket, stream.run_id, len(prompt_ids), prior)
            stream.headers = record_headers("TokenEvent", active.spans.trace)
        self.ledger.add(active)
        ack = stream.emit(admission.started)
        metrics.QUEUE_TIME.observe(admission.started.queue_ms / 1000)
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        if prior.run_id:
            log.info("request %s: continuing run %s after %d tokens", rid, prior.run_id, len(prior.token_ids))
        if rid in self.cancelled or admission.finish_now is not None:
            self._finish(active, "cancelled" if rid in self.cancelled else admission.finish_now or "length")
            return
        if admission.solo:
            log.warning("request %s: %d earlier runs ended without a token; running it alone", rid, prior.stalled_runs)
            self.solo = active
        engine_request = EngineRequest(
            stream.run_id,
            prompt_ids,
            admission.params,
            list(prior.token_ids),
            prior.text,
            urgent=ticket.priority == INTERACTIVE,
        )
        ack.add_done_callback(lambda done: self._to_engine(active, engine_request, done))

    def _to_engine(self, active: Active, request: EngineRequest, started: asyncio.Future[None]) -> None:
        if started.cancelled() or started.exception() is not None:
            return  # the run broke on its Started: on_broken takes the request up again
        if self.ledger.get(active.request_id) is not active or active.stream.abandoned:
            return
        if active.request_id in self.cancelled:
            self._finish(active, "cancelled")
            return
        self.ledger.running(active)
        trace = tracing.NO_TRACE
        if active.spans is not None:
            active.spans.in_engine()
            trace = active.spans.trace
        with tracing.attached(trace):  # the run's task (and what it logs) has the request's trace context current
            task = asyncio.create_task(self._stream_outputs(active, request), name=f"run-{request.request_id}")
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        deadline_ms = active.ticket.request.deadline_ms
        if deadline_ms is not None:
            timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline_ms - _now_ms()) / 1000, self._expire, active
            )
            task.add_done_callback(lambda _: timer.cancel())

    def _expire(self, active: Active) -> None:
        """The request's deadline passed while it ran: the engine stops it at its next step."""
        if self.ledger.get(active.request_id) is active and active.in_engine and not active.stream.abandoned:
            self._expired.add(active.run_id)
            self.engine.abort(active.run_id)

    def _spans(
        self, ticket: Ticket, run_id: str, prompt_tokens: int, prior: Prior, refused: str | None = None
    ) -> RunSpans:
        continues = prior.run_id
        spans = RunSpans(
            ticket.request,
            ticket.trace or prior.trace,  # a request produced without a context: the trace its first run started
            run_id,
            self.worker_id,
            queued_from_ns=queue_start_ns(ticket.appended_ms, ticket.queued_ns, continues is not None),
            prompt_tokens=prompt_tokens,
            continues=continues,
            continued_tokens=len(prior.token_ids),
            refused=refused,
        )
        ticket.trace = spans.trace  # a later run here (preempted, or after a lost event) continues the same trace
        return spans

    def _stream(self, ticket: Ticket) -> RunStream:
        stream = RunStream(self.publisher, ticket.request.request_id, uuid.uuid4().hex)
        stream.on_broken = lambda s: self._broken(ticket, s)
        return stream

    # Engine ------------------------------------------------------------------------------------------------

    async def run_engine(self) -> None:
        """Run the engine's background work until cancelled."""
        await self.engine.serve()

    async def _stream_outputs(self, active: Active, request: EngineRequest) -> None:
        """Publish what the engine generates for one run; a refusal or an engine failure fails the request."""
        try:
            async for out in self.engine.generate(request):
                self.on_output(out)
                self._step_seen()
                metrics.RUNNING.set(self.engine.num_running)
                metrics.WAITING.set(self.engine.num_waiting)
        except Exception as exc:
            self.ledger.run_ended(request.request_id)
            if isinstance(exc, EngineRefused):
                failed = Failed(exc.code, exc.message)
            else:
                log.error("engine failed run %s", request.request_id, exc_info=exc)
                failed = Failed("internal", INTERNAL.format("running"))
            if self.ledger.get(active.request_id) is active and not active.stream.abandoned:
                self._fail(active, failed)

    def _step_seen(self) -> None:
        """Count one engine step per turn of the event loop in which runs got outputs: a step's outputs reach
        their runs' tasks together, and the count runs after them (so the dispatcher sees the step's tokens)."""
        if not self._step_pending:
            self._step_pending = True
            asyncio.get_running_loop().call_soon(self._stepped)

    def _stepped(self) -> None:
        self._step_pending = False
        self.steps += 1
        if self.wake_each_step:
            self.changed.set()

    def on_output(self, out: StepOutput) -> None:
        active = self.ledger.run(out.request_id)  # the engine's request id is the run id
        if active is None:
            return
        if out.finish_reason is not None:
            self.ledger.run_ended(out.request_id)
        if active.stream.abandoned or active.stream.broken:
            return
        if out.token_ids:
            now = time.monotonic()
            if active.last_token is None:
                metrics.TTFT.observe(now - active.started)
                active.first_token_ms = int((now - active.started) * 1000)
                if active.spans is not None:
                    active.spans.first_token()
            else:
                metrics.ITL.observe(now - active.last_token)
            active.last_token = now
            active.completion += len(out.token_ids)
            metrics.GENERATION_TOKENS.inc(len(out.token_ids))
            self.on_tokens(active.ticket, len(out.token_ids))
            if self.solo is active:
                self._clear_solo()
        active.stream.tokens(out.token_ids, out.text, out.index, out.logprobs)
        if out.index == 0:
            active.text += out.text
        if out.finish_reason is not None:
            active.choice_finish_reasons = out.choice_finish_reasons
            if out.request_id in self._expired:
                self._expired.discard(out.request_id)
                deadline = active.ticket.request.deadline_ms
                message = f"deadline {deadline} passed after {active.completion} tokens"
                self._fail(active, Failed("deadline_exceeded", message))
            else:
                self._finish(active, "cancelled" if out.finish_reason == "aborted" else out.finish_reason)

    # Endings -----------------------------------------------------------------------------------------------

    def _finish(self, active: Active, reason: str) -> None:
        finished = Finished(
            finish_reason=reason,
            usage=Usage(active.prompt_tokens, active.completion),
            ttft_ms=active.first_token_ms,
            total_ms=int((time.monotonic() - active.started) * 1000),
            tool_calls=_tool_calls(active),
            choice_finish_reasons=_choice_reasons(active, reason),
        )
        log.info("request %s: finished (%s, %d tokens)", active.request_id, reason, active.completion)
        metrics.E2E.observe(max(0.0, _now_ms() - active.ticket.created_ms) / 1000)
        if active.spans is not None:
            active.spans.ended(reason, active.completion, active.progress)
        self._close_when_acked(active.ticket, active.stream.finish(finished), reason, active)

    def _fail(self, active: Active, failed: Failed) -> None:
        log.warning("request %s: failed: %s", active.request_id, failed.message)
        if active.spans is not None:
            active.spans.ended(failed.code, active.completion, active.progress, failed=True)
        self._close_when_acked(active.ticket, active.stream.finish(failed), None, active)

    def _close_when_acked(
        self, ticket: Ticket, ack: asyncio.Future[None], reason: str | None, active: Active | None
    ) -> None:
        """Close the ticket once the terminal event is in the log; ``reason`` None for a Failed."""

        def acked(done: asyncio.Future[None]) -> None:
            ok = not done.cancelled() and done.exception() is None
            if active is not None:
                if active.spans is not None:
                    active.spans.published(ok)
                self._forget(active)
            if not ok:
                return  # the run broke: on_broken has the request taken up again
            if reason is not None:  # request_success_total counts Finished requests only, as vLLM's does
                metrics.SUCCESS.labels(finished_reason=reason).inc()
            self.on_closed(ticket)

        ack.add_done_callback(acked)

    def _broken(self, ticket: Ticket, stream: RunStream) -> None:
        """An event of ``stream`` was lost: stop the run and have the request taken up again from the log."""
        rid = ticket.request.request_id
        active = self.ledger.get(rid)
        if active is not None and active.stream is stream:
            if active.in_engine:
                self.engine.abort(active.run_id)
            if active.spans is not None:
                active.spans.stopped("event_lost", active.completion, active.progress)
            self._forget(active)
        log.warning("request %s: run %s lost an event; taking the request up again", rid, stream.run_id)
        self.on_retake(ticket)

    def _forget(self, active: Active) -> None:
        self.ledger.remove(active)
        self._expired.discard(active.run_id)
        if self.solo is active:
            self._clear_solo()
        self.changed.set()

    def _clear_solo(self) -> None:
        self.solo = None
        self.changed.set()

    # Cancellation and rebalancing --------------------------------------------------------------------------

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)
        active = self.ledger.get(request_id)
        if active is not None and active.in_engine:
            self.engine.abort(active.run_id)

    def abandon(self, which: Callable[[Ticket], bool], why: str = "abandoned") -> list[Active]:
        """Stop these runs without a terminal event (another worker continues them from the log)."""
        gone = self.ledger.select(lambda a: which(a.ticket))
        for active in gone:
            rid = active.request_id
            log.info("request %s: abandoning run %s", rid, active.run_id, extra={"request_id": rid})
            if active.spans is not None:
                active.spans.stopped(why, active.completion, active.progress)
            active.stream.abandoned = True
            if active.in_engine:
                self.engine.abort(active.run_id)
            self._forget(active)
        return gone

    def preempt(self, request_id: str) -> Handover | None:
        """Stop a run at this step boundary without a terminal event, its pending tokens sent first, so a later run
        continues it from the log; None if it is not running."""
        active = self.ledger.get(request_id)
        if active is None or not active.in_engine or active.stream.broken or self.solo is active:
            return None
        log.info(
            "request %s: preempting run %s after %d tokens",
            request_id,
            active.run_id,
            active.completion,
            extra={"request_id": request_id},
        )
        stream = active.stream
        last = stream.hand_over()
        self.abandon(lambda ticket: ticket is active.ticket, "preempted")
        prior = Prior(
            run_id=stream.run_id,
            token_ids=active.continued_ids + tuple(stream.sent_ids),
            text=active.continued_text + stream.sent_text,
        )
        return Handover(active.ticket, last, prior)

    async def wait_changed(self) -> None:
        self.changed.clear()
        await self.changed.wait()

    def close(self) -> None:
        for task in self._streams:
            task.cancel()
        self.engine.close()


def _tool_calls(active: Active) -> str | None:
    """The calls the whole answer (earlier runs' text included) makes, as the Finished record carries them."""
    request = active.ticket.request
    if not calls_tools(request.tools, request.tool_choice):
        return None
    _, calls = split_calls(active.text, tool_names(request.tools))
    return json.dumps(openai_calls(request.request_id, calls), ensure_ascii=False) if calls else None


def _choice_reasons(active: Active, reason: str) -> tuple[str, ...]:
    """Each choice's finish reason for a request with n > 1 (the engine's, or ``reason`` for all when it ended
    before the engine said)."""
    n = active.ticket.request.n
    reasons = tuple("cancelled" if r == "aborted" else r for r in active.choice_finish_reasons)
    return (reasons if len(reasons) == n else (reason,) * n) if n > 1 else ()


def _ignore(_: Ticket) -> None:
    pass


def _ignore_tokens(_: Ticket, __: int) -> None:
    pass


def _now_ms() -> int:
    return int(time.time() * 1000)

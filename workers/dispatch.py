"""Admission of one served model, between its look-ahead and its engine: what runs next, preemption, deadlines.

No Kafka here: the intake (``ServedModel``) queues the requests it reads, and answers whether a request is still its
own, what the log holds of it, and where a poison request goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from schemas.errors import TokenRelayError
from schemas.records import InferenceRequest
from services import tracing
from services.logs import request_context
from services.settings import Settings
from workers import metrics
from workers.admission import Refusal
from workers.core import Handover, ModelCore
from workers.fairshare import Waiting
from workers.history import Prior
from workers.ledger import Ticket
from workers.scheduling import RunningView, Scheduler

log = logging.getLogger(__name__)

IDLE_PASS_S = 1.0  # a scheduling pass at least this often, whatever wakes it


class Intake(Protocol):
    """What the dispatcher asks of the Kafka side."""

    def owns(self, ticket: Ticket) -> bool: ...
    async def prior(self, ticket: Ticket) -> Prior | None: ...
    async def dead_letter(self, record: Any, error: TokenRelayError) -> None: ...
    def admitted(self) -> None: ...


class Dispatcher:
    """Runs scheduling passes over a ``Scheduler`` and carries out their plans on a ``ModelCore``.

    Admissions run as tasks of their own (a request continued from the log reads it first), each holding its slot
    meanwhile, so a pass never waits on Kafka. A preempted run goes back to the front of its tenant's queue once its
    last event is acknowledged.
    """

    def __init__(self, settings: Settings, core: ModelCore, scheduler: Scheduler[Ticket], intake: Intake):
        self.settings = settings
        self.name = core.limits.model
        self.core = core
        self.scheduler = scheduler
        self.intake = intake
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitting = 0  # requests between the look-ahead and the ledger (reading their log)
        self._cancelled_waiting: list[Ticket] = []
        self._solo_waiting = 0  # admissions waiting for the ledger to empty, to run alone

    def stop(self) -> None:
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()

    def queue(self, ticket: Ticket, *, front: bool = False, arrival: bool = True) -> bool:
        """Put a request in the look-ahead; False when a request of that id already waits there."""
        request = ticket.request
        if tracing.enabled():
            ticket.queued_ns = time.time_ns()
        waiting = Waiting(
            request.request_id,
            ticket.priority,
            request.tenant,
            ticket.created_ms,
            request.deadline_ms,
            ticket,
            self._prompt_hint(request),
            self.core.steps,
        )
        queued = self.scheduler.push(waiting, front=front, arrival=arrival)
        self.core.changed.set()
        return queued

    def cancel(self, request_id: str) -> None:
        """A cancel: a running request stops within one step; a waiting one ends at once, without a slot."""
        self.core.cancel(request_id)
        waiting = self.scheduler.get(request_id)
        if waiting is not None:
            self.scheduler.remove(lambda w: w is not waiting)
            self.end_cancelled(waiting.item)

    def end_cancelled(self, ticket: Ticket) -> None:
        """End a request that was cancelled before it ran, at once and without a slot."""
        self._cancelled_waiting.append(ticket)
        self.core.changed.set()

    async def run(self) -> None:
        """Scheduling passes until ``stop()``: on any change (a request read or ended), at the nearest deadline, and
        after every engine step while interactive requests wait."""
        while not self._stopping.is_set():
            self.core.changed.clear()
            self._expire()
            self._dispatch()
            timeout = IDLE_PASS_S
            deadline = self.scheduler.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, (deadline - _now_ms()) / 1000) + 0.001)
            self.core.wake_each_step = self.scheduler.blocked()  # interactive requests wait: a pass per step
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.core.changed.wait(), timeout)

    def _expire(self) -> None:
        """End the waiting requests whose deadline passed: admission refuses them with deadline_exceeded."""
        for waiting in self.scheduler.expired(_now_ms()):
            metrics.DEADLINE_IN_QUEUE.labels(self.name, waiting.priority).inc()
            self.intake.admitted()
            self.admit_soon(waiting.item)

    def _dispatch(self) -> None:
        cancelled, self._cancelled_waiting = self._cancelled_waiting, []
        for ticket in cancelled:
            self.admit_soon(ticket)  # ends at once as cancelled
        if self._stopping.is_set():
            return
        free = self.settings.max_batch_size - len(self.core.ledger) - self._admitting
        if self.core.solo is not None or self._solo_waiting:
            free = 0  # a suspect request runs alone
        running = [
            RunningView(
                a.request_id,
                a.ticket.priority,
                a.progress,
                a.ticket.request.max_tokens - a.completion,
                preempted=a.ticket.preemptions > 0,
            )
            for a in self.core.ledger
            if a.in_engine
        ]
        plan = self.scheduler.plan(free, running, self.core.steps)
        for request_id in plan.preempt:
            self._preempt(request_id)
        if plan.admit:
            self.intake.admitted()
        for waiting in plan.admit:
            self.admit_soon(waiting.item)

    def _preempt(self, request_id: str) -> None:
        handover = self.core.preempt(request_id)
        if handover is None:
            return
        metrics.PREEMPTIONS.labels(self.name).inc()
        handover.ticket.check_log = True
        handover.ticket.preemptions += 1
        task = asyncio.create_task(self._requeue(handover), name=f"requeue-{request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _requeue(self, handover: Handover) -> None:
        """Back to the front of its tenant's queue once the run's last event is in the log, to continue from there.

        When every event of the run was acknowledged, the log holds exactly what the run sent, and the next run
        starts from that without reading it again; otherwise it reads the log, as after a worker death.
        """
        ticket = handover.ticket
        ticket.handed_over = None
        if handover.last is not None:
            with contextlib.suppress(Exception):
                await handover.last
        if handover.last is None or (not handover.last.cancelled() and handover.last.exception() is None):
            ticket.handed_over = handover.prior
        if self.intake.owns(ticket) and not self._stopping.is_set():
            self.queue(ticket, front=True, arrival=False)
            self.core.changed.set()

    def served(self, ticket: Ticket, tokens: int) -> None:
        """A run of ``ticket`` generated ``tokens``: its tenant is charged for them."""
        self.scheduler.charge(ticket.priority, ticket.request.tenant, tokens)

    def _prompt_hint(self, request: InferenceRequest) -> float:
        """What a request is charged when picked, before its prompt is tokenized (about 4 characters a token)."""
        chars = sum(len(m.content) for m in request.messages) if request.messages else len(request.prompt)
        return self.settings.fair_prompt_token_cost * (chars // 4 + 1)

    def admit_soon(self, ticket: Ticket) -> None:
        """Admit in a task of its own (its log may have to be read first): the scheduling loop never waits on Kafka,
        and the slot stays reserved meanwhile."""
        self._admitting += 1
        task = asyncio.create_task(self._admit_reserved(ticket), name=f"admit-{ticket.request.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def admit_now(self, ticket: Ticket) -> None:
        """Admit at once, whatever the free slots (a run taken up again after it lost an event)."""
        self._admitting += 1
        await self._admit_reserved(ticket)

    async def _admit_reserved(self, ticket: Ticket) -> None:
        # The run's callbacks and task are made in here: they keep logging with the request id (and, tracing on,
        # with its trace context current).
        with request_context(ticket.request.request_id), tracing.attached(ticket.trace):
            try:
                if self.intake.owns(ticket):  # else revoked while it waited; the new owner reads it again
                    await self._admit_owned(ticket)
            finally:
                self._admitting -= 1

    async def _admit_owned(self, ticket: Ticket) -> None:
        prior: Prior | None
        if ticket.handed_over is not None:
            prior, ticket.handed_over = ticket.handed_over, None
        else:
            prior = await self.intake.prior(ticket) if ticket.check_log else Prior()
        if prior is None or not self.intake.owns(ticket):
            return  # stopping, or no longer ours
        if prior.terminal:
            log.info("request %s: already ended in the log; skipping", ticket.request.request_id)
            self.core.on_closed(ticket)
            return
        decision, prompt_ids = self.core.decide(ticket, prior)
        if isinstance(decision, Refusal):
            if decision.dead_letter:
                _, record = ticket.source
                error = TokenRelayError(decision.failed.message, code=decision.failed.code)
                await self.intake.dead_letter(record, error)
                if not self.intake.owns(ticket):
                    return  # revoked meanwhile: its refusal is the new owner's to write
            self.core.refuse(ticket, decision.failed)
            return
        cost = self.settings.fair_prompt_token_cost * len(prompt_ids) - self._prompt_hint(ticket.request)
        self.scheduler.charge(ticket.priority, ticket.request.tenant, cost)
        if decision.solo:
            self._solo_waiting += 1  # nothing else is admitted meanwhile
            try:
                while len(self.core.ledger) > 0 and not self._stopping.is_set():
                    await self.core.wait_changed()  # a suspect request runs alone: it must not take others down
            finally:
                self._solo_waiting -= 1
            if not self.intake.owns(ticket):
                return  # revoked while it waited (a revocation empties the ledger): the new owner runs it
        self.core.run(ticket, decision, prompt_ids, prior)


def _now_ms() -> int:
    return int(time.time() * 1000)

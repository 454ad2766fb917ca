"""A run's spans while tracing is on: queue wait, prefill, decode and publish, in its request's trace."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from schemas.records import InferenceRequest
from services import tracing
from services.tracing import TraceHeaders

if TYPE_CHECKING:
    from opentelemetry.trace import Span


def queue_start_ns(appended_ms: int, queued_ns: int, continued: bool) -> int:
    """Where a run's queue wait starts: the request record's append time for its first run; for a continuation (after
    a worker's death, a lost event or a preemption) the time this worker queued it, since the wait before the earlier
    run is not this run's (pure)."""
    if continued or appended_ms <= 0:
        return queued_ns or time.time_ns()
    return min(tracing.ms_to_ns(appended_ms), queued_ns or time.time_ns())


class RunSpans:
    """The spans of one run of a request, all children of the request's context (the gateway's submit span, from the
    request record's ``traceparent``); a request that came without one starts its trace here, at its queue wait.

    Queue wait ends at admission, where prefill starts; prefill ends at the first token, where decode starts; decode
    ends with the run's terminal event, whose send to Kafka until its acknowledgement is the publish span.
    ``trace`` is what the run's events carry in their headers.
    """

    __slots__ = ("attributes", "decode", "prefill", "publish", "trace")

    def __init__(
        self,
        request: InferenceRequest,
        parent: TraceHeaders,
        run_id: str,
        worker: str,
        *,
        queued_from_ns: int,
        prompt_tokens: int,
        continues: str | None = None,
        continued_tokens: int = 0,
        refused: str | None = None,
    ):
        now = time.time_ns()
        self.attributes: dict[str, Any] = {
            "gen_ai.request.model": request.model,
            "tokenrelay.request_id": request.request_id,
            "tokenrelay.run_id": run_id,
            "tokenrelay.worker": worker,
        }
        queue_attributes = {
            **tracing.request_attributes(request),
            **self.attributes,
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
        }
        if continues:
            queue_attributes["tokenrelay.continues_run_id"] = continues
            queue_attributes["tokenrelay.continued_tokens"] = continued_tokens
        queue = tracing.start_span(
            tracing.QUEUE_WAIT, parent, kind="consumer", start_ns=min(queued_from_ns, now), attributes=queue_attributes
        )
        self.trace = parent or tracing.trace_of(queue)
        self.decode: Span | None = None
        self.publish: Span | None = None
        self.prefill: Span | None = None
        if refused is not None:
            queue.set_attribute("tokenrelay.refused", refused)
            tracing.fail(queue, refused)
            queue.end(now)
            return
        queue.end(now)
        self.prefill = tracing.start_span(
            tracing.PREFILL,
            self.trace,
            start_ns=now,
            attributes={**self.attributes, "gen_ai.usage.input_tokens": prompt_tokens},
        )

    def in_engine(self) -> None:
        """The run's Started is acknowledged and the engine has it (an event on the prefill span)."""
        if self.prefill is not None:
            self.prefill.add_event("engine")

    def first_token(self) -> None:
        if self.prefill is None:
            return
        now = time.time_ns()
        self.prefill.end(now)
        self.prefill = None
        self.decode = tracing.start_span(tracing.DECODE, self.trace, start_ns=now, attributes=self.attributes)

    def ended(self, outcome: str, output_tokens: int, run_tokens: int, *, failed: bool = False) -> None:
        """The run ends with its terminal event (``outcome``: a finish reason, or a Failed's code); publish starts."""
        now = time.time_ns()
        self._close(outcome, output_tokens, run_tokens, failed, now)
        self.publish = tracing.start_span(
            tracing.PUBLISH,
            self.trace,
            kind="producer",
            start_ns=now,
            attributes={**self.attributes, "messaging.system": "kafka", "messaging.operation.type": "send"},
        )

    def published(self, ok: bool) -> None:
        """The terminal event is acknowledged (``ok``), or its run broke."""
        if self.publish is not None:
            if not ok:
                tracing.fail(self.publish, "not acknowledged")
            self.publish.end()
            self.publish = None

    def stopped(self, why: str, output_tokens: int, run_tokens: int) -> None:
        """The run stops without a terminal event (abandoned, preempted, or an event was lost)."""
        self._close(why, output_tokens, run_tokens, False, time.time_ns())

    def _close(self, outcome: str, output_tokens: int, run_tokens: int, failed: bool, now: int) -> None:
        for span in (self.prefill, self.decode):
            if span is None:
                continue
            span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
            span.set_attribute("tokenrelay.run_tokens", run_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", [outcome])
            if failed:
                tracing.fail(span, outcome)
            span.end(now)
        self.prefill = self.decode = None

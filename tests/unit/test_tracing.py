"""Tracing's pure parts: when it is on, the W3C context in headers, queue-wait timing; a worker run's spans."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import ControlEvent, Delta, Finished, InferenceRequest, TokenEvent
from services import tracing
from services.kafka import Headers, record_headers
from services.logs import JsonFormatter
from workers.admission import Admission, Limits
from workers.control import CancelledIds, ControlReader
from workers.core import ModelCore
from workers.engine.engine import Engine
from workers.engine.port import StepLoopPort
from workers.history import Prior
from workers.ledger import Ticket
from workers.spans import queue_start_ns

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STATE = "congo=t61rcWkgMzE"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install_for_tests(provider)
    try:
        yield exporter
    finally:
        tracing.install_for_tests(None)


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_on_only_when_the_standard_variables_ask(environ: dict[str, str], wanted: bool) -> None:
    assert tracing.wanted(environ) is wanted


def test_off_by_default_and_configure_is_a_no_op_then() -> None:
    assert not tracing.enabled()
    assert tracing.configure("tokenrelay-test", {}) is False
    assert not tracing.enabled()
    assert tracing.current_trace() == ()


def test_trace_context_is_picked_from_record_and_http_headers_as_it_is() -> None:
    headers = [("content-type", b"x"), ("traceparent", PARENT.encode()), ("tracestate", STATE.encode())]
    trace = tracing.record_trace(headers)
    assert trace == (("traceparent", PARENT.encode()), ("tracestate", STATE.encode()))
    assert tracing.record_trace([("content-type", b"x")]) == ()
    assert tracing.record_trace([("tracestate", STATE.encode())]) == ()  # a state without a parent is no context
    assert tracing.record_trace(None) == ()
    assert tracing.http_trace({"traceparent": PARENT, "tracestate": STATE}) == trace
    assert tracing.http_trace({"x": "y"}) == ()
    assert tracing.as_http(trace) == {"traceparent": PARENT, "tracestate": STATE}
    assert tracing.trace_id_of(trace) == "0af7651916cd43dd8448eb211c80319c"
    assert record_headers("TokenEvent", trace)[1:] == list(trace)


def test_a_span_under_a_record_s_context_and_its_context_back_in_headers(exported: InMemorySpanExporter) -> None:
    trace = tracing.http_trace({"traceparent": PARENT, "tracestate": STATE})
    span = tracing.start_span(tracing.SUBMIT, trace, kind="producer", attributes={"a": 1})
    child = tracing.trace_of(span)
    span.end()
    (done,) = exported.get_finished_spans()
    assert done.context is not None and done.parent is not None
    assert f"{done.context.trace_id:032x}" == tracing.trace_id_of(trace) == tracing.trace_id_of(child)
    assert done.parent.span_id == 0xB7AD6B7169203331
    assert dict(child)["tracestate"] == STATE.encode()  # the vendors' state travels on
    assert tracing.context_of((("traceparent", b"00-garbage"),)) is None


def test_queue_wait_starts_at_the_record_s_append_time_unless_the_run_continues_another() -> None:
    appended_ms, queued_ns = 1_700_000_000_000, 1_700_000_000_500 * 1_000_000
    assert queue_start_ns(appended_ms, queued_ns, continued=False) == appended_ms * 1_000_000
    assert queue_start_ns(appended_ms, queued_ns, continued=True) == queued_ns
    # A record stamped after this worker queued it (clocks apart): never a negative wait.
    assert queue_start_ns(appended_ms + 900, queued_ns, continued=False) == queued_ns


class Recorder:
    """An event sink that acknowledges at once and keeps each event's headers."""

    def __init__(self) -> None:
        self.events: list[tuple[TokenEvent, Headers | None]] = []

    def publish(self, event: TokenEvent, headers: Headers | None = None) -> asyncio.Future[None]:
        self.events.append((event, headers))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def _settle() -> None:
    for _ in range(6):
        await asyncio.sleep(0)


def _core(engine: Engine, sink: Recorder, worker: str = "w-1") -> tuple[ModelCore, StepLoopPort]:
    limits = Limits(
        model="default",
        context_length=engine.max_positions,
        max_prompt_tokens=1024,
        max_tokens_limit=1024,
        has_chat_template=engine.has_chat_template,
        max_stalled_runs=3,
    )
    port = StepLoopPort(engine)
    return ModelCore(port, limits, sink, worker, CancelledIds()), port  # type: ignore[arg-type]


async def _run(core: ModelCore, port: StepLoopPort, ticket: Ticket, prior: Prior, engine: Engine) -> list[int]:
    """Admit and run ``ticket`` to its end; its prompt's token ids."""
    decision, prompt_ids = core.decide(ticket, prior)
    assert isinstance(decision, Admission)
    core.run(ticket, decision, prompt_ids, prior)
    await _settle()
    port.feed()
    while engine.has_work():
        port.feed()
        port.dispatch(engine.step())
        await _settle()
    return prompt_ids


async def test_a_run_s_spans_hang_under_the_request_s_context_and_its_events_carry_it(
    exported: InMemorySpanExporter, engine: Engine
) -> None:
    sink = Recorder()
    core, port = _core(engine, sink)
    request = InferenceRequest(new_request_id(), "The quick brown fox", 6, temperature=0.0, model="default")
    trace = tracing.http_trace({"traceparent": PARENT})
    ticket = Ticket(request, None, 0, trace=trace, appended_ms=1_700_000_000_000, queued_ns=1_700_000_000_500_000_000)
    prompt_ids = await _run(core, port, ticket, Prior(), engine)

    assert all(headers is not None and list(trace) == headers[1:] for _, headers in sink.events)
    assert isinstance(sink.events[-1][0].payload, Finished)
    tokens = sum(len(ev.payload.token_ids) for ev, _ in sink.events if isinstance(ev.payload, Delta))
    spans: dict[str, ReadableSpan] = {s.name: s for s in exported.get_finished_spans()}
    assert sorted(spans) == sorted([tracing.QUEUE_WAIT, tracing.PREFILL, tracing.DECODE, tracing.PUBLISH])
    for span in spans.values():
        assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331
        assert span.context is not None and f"{span.context.trace_id:032x}" == tracing.trace_id_of(trace)
    queue, prefill, decode, publish = (
        spans[n] for n in (tracing.QUEUE_WAIT, tracing.PREFILL, tracing.DECODE, tracing.PUBLISH)
    )
    assert queue.start_time == 1_700_000_000_000 * 1_000_000
    assert queue.end_time == prefill.start_time and prefill.end_time == decode.start_time
    assert decode.end_time is not None and publish.start_time is not None and decode.end_time <= publish.start_time
    assert queue.attributes is not None and queue.attributes["gen_ai.request.max_tokens"] == 6
    assert prefill.attributes is not None and prefill.attributes["gen_ai.usage.input_tokens"] == len(prompt_ids)
    assert decode.attributes is not None and decode.attributes["gen_ai.usage.output_tokens"] == tokens
    assert decode.attributes["gen_ai.response.finish_reasons"] == ("length",)


def test_a_cancel_that_carries_a_context_is_a_span_in_its_trace(exported: InMemorySpanExporter) -> None:
    cancelled: list[str] = []
    reader = ControlReader(None, "control", cancelled.append)  # _take reads no Kafka
    rid = new_request_id()
    trace = tracing.http_trace({"traceparent": PARENT})
    value = default_codec().encode(ControlEvent(rid, "cancel", 0, "client_request"))
    reader._take(0, value, record_headers("ControlEvent", trace))
    reader._take(1, value, record_headers("ControlEvent"))  # no context: cancelled all the same, no span
    assert cancelled == [rid, rid]
    (span,) = exported.get_finished_spans()
    assert span.name == tracing.CANCEL and span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331
    assert span.attributes is not None and span.attributes["tokenrelay.reason"] == "client_request"


async def test_a_request_without_a_context_starts_its_trace_and_a_continuation_joins_it(
    exported: InMemorySpanExporter, engine: Engine
) -> None:
    sink = Recorder()
    core, port = _core(engine, sink)
    request = InferenceRequest(new_request_id(), "The quick brown fox", 4, temperature=0.0, model="default")
    await _run(core, port, Ticket(request, None, 0), Prior(), engine)
    first = {s.name: s for s in exported.get_finished_spans()}
    queue, decode = first[tracing.QUEUE_WAIT], first[tracing.DECODE]
    assert queue.parent is None and queue.context is not None  # the root: the request came without a context
    assert decode.parent is not None and decode.parent.span_id == queue.context.span_id
    carried = {tracing.trace_id_of(tracing.record_trace(headers)) for _, headers in sink.events}
    assert carried == {f"{queue.context.trace_id:032x}"}

    # Another worker continues it from the log: the trace comes from its events' headers (Prior.trace).
    exported.clear()
    other, port = _core(engine, Recorder(), "w-2")
    headers = sink.events[-1][1]
    prior = Prior(run_id=sink.events[-1][0].run_id, trace=tracing.record_trace(headers))
    await _run(other, port, Ticket(request, None, 0), prior, engine)
    again = {s.name: s for s in exported.get_finished_spans()}
    assert all(s.context is not None and s.context.trace_id == queue.context.trace_id for s in again.values())
    attributes = again[tracing.QUEUE_WAIT].attributes
    assert attributes is not None and attributes["tokenrelay.continues_run_id"] == prior.run_id


class JsonLines(logging.Handler):
    """Formats each record as it is logged (where the code runs, with its context current)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, str]] = []
        self.formatter_ = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.formatter_.format(record)))


async def test_a_run_logs_with_its_request_s_trace_id(exported: InMemorySpanExporter, engine: Engine) -> None:
    lines = JsonLines()
    logger = logging.getLogger("workers.core")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        core, port = _core(engine, Recorder())
        request = InferenceRequest(new_request_id(), "The quick brown fox", 4, temperature=0.0, model="default")
        trace = tracing.http_trace({"traceparent": PARENT})
        await _run(core, port, Ticket(request, None, 0, trace=trace), Prior(), engine)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    finished = [line for line in lines.lines if "finished" in line["message"]]
    assert finished and finished[0]["trace_id"] == tracing.trace_id_of(trace)

"""OpenTelemetry traces: W3C trace context in HTTP and Kafka headers, and spans; off unless ``OTEL_*`` asks for them.

Tracing is an optional extra (``pip install 'tokenrelay[tracing]'``). It is on in a process when ``configure`` finds
the standard variables asking for traces (``OTEL_TRACES_EXPORTER``, or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``)
and the SDK installed; everything else (sampler, batch processor, exporter endpoint, headers, resource) is read by
the SDK itself from its usual variables. While it is off, ``enabled()`` is False and callers skip all trace work:
no span objects, no header parsing.

The trace context travels as ``TraceHeaders``: the ``traceparent`` (and ``tracestate``) pairs exactly as they sit in a
Kafka record's headers, so passing a request's context on from one record to the next copies two references.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from schemas.records import InferenceRequest

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span, SpanKind, Tracer

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TraceHeaders = tuple[tuple[str, bytes], ...]
NO_TRACE: TraceHeaders = ()

# Span names: one per stage of a request's path (docs/operations.md, "Tracing").
SUBMIT = "tokenrelay.submit"
QUEUE_WAIT = "tokenrelay.queue_wait"
PREFILL = "tokenrelay.prefill"
DECODE = "tokenrelay.decode"
PUBLISH = "tokenrelay.publish"
FIRST_BYTE = "tokenrelay.first_byte"
CANCEL = "tokenrelay.cancel"

_tracer: Tracer | None = None
_provider: Any = None


def enabled() -> bool:
    """Whether this process records spans (``configure`` found them asked for): the one check on every hot path."""
    return _tracer is not None


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces: an exporter other than ``none`` named in
    ``OTEL_TRACES_EXPORTER``, or (that unset) an OTLP endpoint; never with ``OTEL_SDK_DISABLED=true``."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if exporters:
        return any(name.strip() not in ("", "none") for name in exporters.split(","))
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on for this process when the environment asks for it; True when on.

    ``service_name`` is the default ``service.name`` (``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` win).
    """
    global _tracer, _provider
    if _tracer is not None or not wanted(environ):
        return _tracer is not None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_* variables ask for traces, but the OpenTelemetry SDK is not installed: tracing stays off "
            "(pip install 'tokenrelay[tracing]')"
        )
        return False
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    exporters = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    for name in exporters:
        exporter = _exporter(name, environ)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("tokenrelay")
    log.info("tracing on: service %s, exporters %s", resource.attributes.get("service.name"), ",".join(exporters))
    return True


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name in ("", "none"):
        return None
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        log.warning("OTEL_TRACES_EXPORTER: unknown exporter %r ignored (otlp, console or none)", name)
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol.strip() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Export what is still buffered and stop (at the end of a process; a no-op when tracing is off)."""
    global _tracer, _provider
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as exc:
            log.warning("tracing: flushing the last spans failed: %s", exc)
    _tracer = _provider = None


def install_for_tests(provider: Any) -> None:
    """Record spans with ``provider`` (an SDK TracerProvider, an in-memory exporter on it) in a unit test; None: off."""
    global _tracer, _provider
    _provider = None
    _tracer = provider.get_tracer("tokenrelay") if provider is not None else None


# --- the context in headers ----------------------------------------------------------------------------------------


def record_trace(headers: Sequence[tuple[str, bytes]] | None) -> TraceHeaders:
    """The trace context among a Kafka record's headers (traceparent and tracestate, as they are); () when none."""
    if not headers:
        return NO_TRACE
    found = tuple((key, value) for key, value in headers if key in (TRACEPARENT, TRACESTATE))
    return found if any(key == TRACEPARENT for key, _ in found) else NO_TRACE


def http_trace(headers: Mapping[str, str]) -> TraceHeaders:
    """The W3C trace context of an HTTP request's (or response's) headers, as TraceHeaders; () when none."""
    parent = headers.get(TRACEPARENT)
    if not parent:
        return NO_TRACE
    state = headers.get(TRACESTATE)
    pairs = [(TRACEPARENT, parent.strip().encode())]
    if state:
        pairs.append((TRACESTATE, state.strip().encode()))
    return tuple(pairs)


def as_http(trace: TraceHeaders) -> dict[str, str]:
    """TraceHeaders as HTTP headers."""
    return {key: value.decode("latin-1") for key, value in trace}


def context_of(trace: TraceHeaders) -> Context | None:
    """The OpenTelemetry context TraceHeaders carry; None when they carry none, or a malformed one."""
    if not trace:
        return None
    from opentelemetry import trace as api
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {key: value.decode("latin-1") for key, value in trace}
    context = TraceContextTextMapPropagator().extract(carrier)
    return context if api.get_current_span(context).get_span_context().is_valid else None


def trace_of(span: Span) -> TraceHeaders:
    """A span's context as TraceHeaders (its traceparent, and tracestate when it has one)."""
    from opentelemetry import trace as api
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, api.set_span_in_context(span))
    return tuple((key, carrier[key].encode()) for key in (TRACEPARENT, TRACESTATE) if key in carrier)


def trace_id_of(trace: TraceHeaders) -> str | None:
    """The 32 hex digits of the trace id in TraceHeaders (pure: no SDK needed); None when there is none."""
    for key, value in trace:
        if key == TRACEPARENT:
            parts = value.split(b"-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                return parts[1].decode("latin-1")
    return None


def request_attributes(request: InferenceRequest) -> dict[str, Any]:
    """A request's attributes, by the GenAI semantic conventions where they have a name for it."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if request.messages else "text_completion",
        "gen_ai.request.model": request.model,
        "gen_ai.request.max_tokens": request.max_tokens,
        "gen_ai.request.temperature": request.temperature,
        "gen_ai.request.top_p": request.top_p,
        "tokenrelay.request_id": request.request_id,
        "tokenrelay.priority": request.priority,
    }
    if request.top_k:
        attributes["gen_ai.request.top_k"] = request.top_k
    if request.seed is not None:
        attributes["gen_ai.request.seed"] = request.seed
    if request.stop:
        attributes["gen_ai.request.stop_sequences"] = list(request.stop)
    if request.tenant:
        attributes["tokenrelay.tenant"] = request.tenant
    return attributes


# --- spans ---------------------------------------------------------------------------------------------------------


def ms_to_ns(ms: int) -> int:
    return ms * 1_000_000


def start_span(
    name: str,
    parent: TraceHeaders | Context | None,
    *,
    kind: str = "internal",
    start_ns: int | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Iterable[TraceHeaders] = (),
) -> Span:
    """A started span under ``parent`` (TraceHeaders, a Context, or None for the current context); the caller ends it.

    ``kind``: internal, server, client, producer or consumer. ``links``: other traces' contexts this one follows on
    from (a client's own context, say). Only call while ``enabled()``.
    """
    assert _tracer is not None, "tracing is off"
    context = context_of(parent) if isinstance(parent, tuple) else parent
    return _tracer.start_span(
        name,
        context=context,
        kind=_kind(kind),
        start_time=start_ns,
        attributes=dict(attributes) if attributes else None,
        links=_links(links),
    )


@contextmanager
def current(span: Span) -> Iterator[Span]:
    """Make ``span`` the current span in this task while the block runs (loggers and child spans see it), and end
    it afterwards, recording an exception that leaves the block."""
    from opentelemetry import trace as api

    with api.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


@contextmanager
def attached(trace: TraceHeaders) -> Iterator[None]:
    """Make the context ``trace`` carries the current one while the block runs (a no-op when it carries none)."""
    context = context_of(trace)
    if context is None:
        yield
        return
    from opentelemetry import context as ctx

    token = ctx.attach(context)
    try:
        yield
    finally:
        ctx.detach(token)


def current_trace() -> TraceHeaders:
    """The current span's context as TraceHeaders; () when there is none (or tracing is off)."""
    if _tracer is None:
        return NO_TRACE
    from opentelemetry import trace as api

    span = api.get_current_span()
    return trace_of(span) if span.get_span_context().is_valid else NO_TRACE


def fail(span: Span, description: str) -> None:
    """Mark ``span`` as failed (status error) with a short description."""
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))


def _kind(kind: str) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return SpanKind[kind.upper()]


def _links(traces: Iterable[TraceHeaders]) -> list[Link] | None:
    from opentelemetry import trace as api
    from opentelemetry.trace import Link

    links = []
    for trace in traces:
        context = context_of(trace)
        if context is not None:
            links.append(Link(api.get_current_span(context).get_span_context()))
    return links or None

"""What every HTTP handler shares: the Gateway, the edge checks (body, key, id, backlog) and producing to Kafka."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from gateway.api.auth import WATCH, Auth
from gateway.api.backlog import BacklogMonitor
from gateway.api.validation import parse_json_object
from gateway.cluster.peers import Peers
from gateway.cluster.quota_log import QuotaLog
from gateway.cluster.quotas import estimate_tokens
from gateway.fanout.relay import Relay
from gateway.metrics import GatewayMetrics
from schemas.codec import default_codec
from schemas.errors import (
    BodyTooLarge,
    FieldError,
    Forbidden,
    ModelNotFound,
    NotFound,
    QueueFull,
    RequestRefused,
    RequestTimeout,
    TokenRelayError,
    Unauthorized,
    ValidationError,
)
from schemas.ids import parse_request_id, request_id_time_ms
from schemas.models import LiveModel, ModelDirectory
from schemas.records import Accepted, ChatMessage, ControlEvent, InferenceRequest, TokenEvent
from schemas.sampling import SamplingParams
from services import tracing
from services.kafka import map_kafka_errors, record_headers
from services.logs import bind_request
from services.requests import submit_request
from services.settings import Settings
from services.tracing import NO_TRACE

log = logging.getLogger(__name__)

FUTURE_ID_MS = 60_000
MAX_REMEMBERED_TENANTS = 100_000


class Producer(Protocol):
    async def send_and_wait(self, topic: str, value: bytes | None, key: bytes, headers: Any = None) -> Any: ...


@dataclass
class Gateway:
    """What the handlers share."""

    settings: Settings
    relay: Relay
    producer: Producer
    metrics: GatewayMetrics
    auth: Auth
    backlog: BacklogMonitor | None = None
    ready_check: Callable[[], Awaitable[str]] | None = None  # why the gateway is not ready; "" when it is
    tenants: dict[str, str] = field(default_factory=dict)
    codec: Any = field(default_factory=default_codec)
    models: ModelDirectory = field(default_factory=ModelDirectory)
    quotas: QuotaLog | None = None
    peers: Peers = field(default_factory=lambda: Peers(os.urandom(32), ""))  # this gateway among its peers


GATEWAY = web.AppKey("gateway", Gateway)


def error_body(exc: TokenRelayError) -> dict[str, Any]:
    """What the JSON ``{"error": ...}`` of an HTTP answer says about a project error: code, message (and field)."""
    body: dict[str, Any] = {"code": exc.code, "message": exc.public_message or exc.message}
    if isinstance(exc, FieldError):
        body["field"] = exc.field
    return body


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


def cors_headers(request: web.Request) -> dict[str, str]:
    """CORS headers of a response the handler prepares itself (the CORS middleware cannot add them afterwards)."""
    origin = request.get("cors_origin")
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}


async def read_json(request: web.Request) -> dict[str, Any]:
    limit = gateway_of(request).settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body is over {limit} bytes")
    timeout_s = gateway_of(request).settings.http_body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            body = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    if len(body) > limit:
        raise BodyTooLarge(f"request body is over {limit} bytes")
    return parse_json_object(body)


def require_key(request: web.Request) -> str:
    """Tenant of the caller's API key ('' when the gateway runs open); 401 otherwise."""
    auth = gateway_of(request).auth
    if not auth.enabled:
        return ""
    tenant = auth.tenant_of(request.headers.get("Authorization"))
    if tenant is None:
        raise Unauthorized("a valid Bearer API key is required")
    return tenant


def client_of(request: web.Request) -> str:
    """Whose share a Kafka backfill counts against: the caller's API key, else its address."""
    tenant = gateway_of(request).auth.tenant_of(request.headers.get("Authorization"))
    return tenant or request.remote or ""


def request_id_of(request: web.Request) -> str:
    """The request id in the path; 404 unless it is a UUIDv7 that is not from the future."""
    request_id = request.match_info["id"]
    try:
        parse_request_id(request_id)
    except ValidationError:
        raise not_found(request_id) from None
    if request_id_time_ms(request_id) > time.time() * 1000 + FUTURE_ID_MS:
        raise not_found(request_id)
    bind_request(request_id)
    return request_id


def not_found(request_id: str) -> NotFound:
    return NotFound(f"no request {request_id[:64]!r}")


async def authorize_read(request: web.Request, request_id: str, scope: int = WATCH) -> None:
    """Allowed with the key that submitted the request, or with a stream token of that scope (cancel: cancel_token)."""
    gw = gateway_of(request)
    if not gw.auth.enabled:
        return
    token = request.query.get("token")
    allowed = gw.auth.scope_of(request_id, token) if token is not None else 0
    if allowed and allowed & scope == scope:
        return
    tenant = gw.auth.tenant_of(request.headers.get("Authorization"))
    if tenant is None and allowed:
        raise Forbidden("this token may only watch; cancel needs the API key or the request's cancel_token")
    if tenant is None:
        raise Unauthorized("an API key or a valid stream token is required")
    # The ownership check may read the request back from Kafka: on the caller's share of such scans.
    owner = gw.tenants.get(request_id) or (await gw.relay.snapshot(request_id, tenant)).tenant
    if owner != tenant:
        # Same answer as an unknown id: a key must not learn which ids exist for other tenants.
        raise not_found(request_id)


def require_known(gw: Gateway, request_id: str, known: bool) -> None:
    """404 for a request the log does not know (``known`` False) whose id is older than the retention window."""
    if not known and request_id_time_ms(request_id) < time.time() * 1000 - gw.settings.events_retention_ms:
        raise not_found(request_id)


def check_backlog(gw: Gateway, model: str) -> None:
    backlog = gw.backlog.backlog_of(model) if gw.backlog is not None else -1
    if backlog > gw.settings.queue_limit:
        raise QueueFull(f"{backlog} requests are waiting for model {model!r}")


def parse_model(body: dict[str, Any]) -> str | None:
    """The `model` a body names, if any (a short served name, as /v1/models lists them)."""
    model = body.get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str) or len(model) > 256:
        raise FieldError("model", "must be a string")
    return model


async def refresh_routes(gw: Gateway, requested: str | None) -> None:
    """Re-list the cluster's topics when ``requested`` is announced but has no requests topic yet (one created since
    the last listing), so that ``resolve_model`` then routes it; awaited by an endpoint before it builds its record."""
    now_ms = int(time.time() * 1000)
    name = requested or gw.settings.default_model
    unresolved = gw.models.resolve(requested, gw.settings.default_model, now_ms) is None
    if unresolved and gw.backlog is not None and gw.models.announced(name, now_ms):
        await gw.backlog.refresh_topics()


def resolve_model(gw: Gateway, requested: str | None) -> LiveModel:
    """The live model a request goes to; 404 model_not_found for a name no live worker serves, 404
    model_not_routable for one announced whose requests topic does not exist (see ``refresh_routes``)."""
    now_ms = int(time.time() * 1000)
    model = gw.models.resolve(requested, gw.settings.default_model, now_ms)
    name = requested or gw.settings.default_model
    if model is None and gw.backlog is not None and gw.models.announced(name, now_ms):
        topic = gw.settings.requests_topic_for(name)
        raise ModelNotFound(
            f"the model {name!r} is announced, but its requests topic {topic!r} does not exist",
            code="model_not_routable",
        )
    if model is None:
        raise ModelNotFound(f"the model {name!r} does not exist or no worker serves it; GET /v1/models lists them")
    return model


def check_limits(model: LiveModel, sampling: SamplingParams, messages: tuple[ChatMessage, ...] | None) -> None:
    """Refuse at the edge what the model announced it cannot take (the prompt's length is checked by the worker)."""
    if messages is not None and not model.has_chat_template:
        raise RequestRefused(
            f"model {model.name!r} has no chat template: send a prompt instead of messages",
            code="chat_template_missing",
        )
    if model.max_tokens_limit and sampling.max_tokens > model.max_tokens_limit:
        raise FieldError("max_tokens", f"must be at most {model.max_tokens_limit} for model {model.name!r}")
    if sampling.max_tokens >= model.context_length:
        raise RequestRefused(
            f"this model's maximum context length is {model.context_length} tokens; max_tokens "
            f"{sampling.max_tokens} leaves no room for the prompt",
            code="context_length_exceeded",
        )


async def produce_request(gw: Gateway, req: InferenceRequest, accepted: Accepted | None = None) -> None:
    """Submit ``req`` within its key's quotas (RateLimited when over one); an ``accepted`` of the caller's is recorded
    first (see ``submit_request``). Tracing on, this is the request's ``submit`` span, a child of the client's
    context (see ``trace_middleware``), and its records carry the span's context."""
    bind_request(req.request_id)
    if not tracing.enabled():
        await _produce_request(gw, req, accepted, NO_TRACE)
        return
    attributes = {
        **tracing.request_attributes(req),
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.destination.name": gw.settings.requests_topic_for(req.model, req.priority),
    }
    with tracing.current(tracing.start_span(tracing.SUBMIT, None, kind="producer", attributes=attributes)) as span:
        await _produce_request(gw, req, accepted, tracing.trace_of(span))


async def _produce_request(
    gw: Gateway, req: InferenceRequest, accepted: Accepted | None, trace: tracing.TraceHeaders
) -> None:
    async def submit() -> None:
        # Bounded: with the broker away, a send can wait for metadata longer than the producer's delivery timeout.
        with map_kafka_errors("cannot produce the request"):
            async with asyncio.timeout(gw.settings.producer_timeout_ms / 1000):
                await submit_request(gw.producer, gw.settings, gw.codec, req, accepted, trace=trace)

    if gw.quotas is None:
        await submit()
    else:
        tokens = estimate_tokens(len(req.prompt), req.max_tokens * req.n)
        await gw.quotas.submit_within(req.request_id, req.tenant, tokens, submit)
    gw.metrics.requests_submitted.inc()
    if req.tenant:
        gw.tenants[req.request_id] = req.tenant
        if len(gw.tenants) > MAX_REMEMBERED_TENANTS:
            gw.tenants.pop(next(iter(gw.tenants)))
    log.info("request %s submitted (tenant %s)", req.request_id, req.tenant or "-")


async def produce_event(gw: Gateway, event: TokenEvent) -> None:
    """Write one event of no run (a Deleted) to the request's events partition."""
    with map_kafka_errors("cannot write the event"):
        async with asyncio.timeout(gw.settings.producer_timeout_ms / 1000):
            await gw.producer.send_and_wait(
                gw.settings.events_topic,
                gw.codec.encode(event),
                key=event.request_id.encode(),
                headers=record_headers("TokenEvent"),
            )


async def produce_cancel(gw: Gateway, request_id: str, reason: str) -> None:
    """Send a cancel, with the request's trace context when tracing is on (else the client's, if it sent one)."""
    event = ControlEvent(request_id, "cancel", int(time.time() * 1000), reason)
    trace = (gw.relay.trace_of(request_id) or tracing.current_trace()) if tracing.enabled() else NO_TRACE
    with map_kafka_errors("cannot send the cancel"):
        async with asyncio.timeout(gw.settings.producer_timeout_ms / 1000):
            await gw.producer.send_and_wait(
                gw.settings.control_topic,
                gw.codec.encode(event),
                key=request_id.encode(),
                headers=record_headers("ControlEvent", trace),
            )
    log.info("request %s: cancel sent (%s)", request_id, reason)

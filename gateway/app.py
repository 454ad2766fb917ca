"""The aiohttp application: thin handlers over the hub, the producer and the validators."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from gateway import pages
from gateway.auth import Auth
from gateway.backlog import BacklogMonitor
from gateway.cursor import Cursor, decode_cursor
from gateway.hub import Hub, Subscription
from gateway.metrics import GatewayMetrics
from gateway.sse import KEEPALIVE, PREAMBLE
from gateway.validation import (
    BodyError,
    parse_json_object,
    parse_messages,
    parse_n,
    parse_prompt,
    parse_sampling,
    parse_stream_flags,
)
from schemas.codec import default_codec
from schemas.errors import CursorError, FieldError, KafkaUnavailable, TokenRelayError, ValidationError
from schemas.ids import new_request_id, parse_request_id, request_id_time_ms
from schemas.records import ChatMessage, ControlEvent, InferenceRequest
from schemas.sampling import SamplingParams
from services.kafka import record_headers
from services.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
FUTURE_ID_MS = 60_000
DISCONNECT_POLL_S = 1.0


class Producer(Protocol):
    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: Any = None) -> Any: ...


@dataclass
class Gateway:
    """What the handlers share."""

    settings: Settings
    hub: Hub
    producer: Producer
    metrics: GatewayMetrics
    auth: Auth
    backlog: BacklogMonitor | None = None
    ready_check: Callable[[], Awaitable[bool]] | None = None
    tenants: dict[str, str] = field(default_factory=dict)
    codec: Any = field(default_factory=default_codec)


GATEWAY = web.AppKey("gateway", Gateway)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "body_too_large", "request body is too large")
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            # Keep headers such as Allow; the body's own Content-Type/Length would clash with the JSON body.
            headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
            return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, headers)
        raise
    except BodyError as exc:
        return error_response(400, exc.code, exc.message)
    except CursorError as exc:
        return error_response(400, exc.code, exc.message)
    except FieldError as exc:
        return web.json_response({"error": {"code": exc.code, "message": exc.message, "field": exc.field}}, status=422)
    except ValidationError as exc:
        return error_response(422, exc.code, exc.message)
    except KafkaUnavailable as exc:
        log.warning("Kafka unavailable: %s", exc)
        return error_response(503, exc.code, "the broker is not reachable; try again", {"Retry-After": "1"})
    except TokenRelayError as exc:
        return error_response(500, exc.code, exc.message)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error")


def cors_middleware(origins: tuple[str, ...]) -> Any:
    allow_any = "*" in origins

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (allow_any or origin in origins)
        if request.method == "OPTIONS" and allowed and "Access-Control-Request-Method" in request.headers:
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin or "",
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
        if allowed:
            request["cors_origin"] = origin
        response = await handler(request)
        if allowed and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin or ""
            response.headers["Vary"] = "Origin"
        return response

    return middleware


def _cors_headers(request: web.Request) -> dict[str, str]:
    origin = request.get("cors_origin")
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}


def _gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


async def read_json(request: web.Request) -> dict[str, Any]:
    limit = _gw(request).settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    body = await request.read()
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return parse_json_object(body)


def require_key(request: web.Request) -> str:
    """Tenant of the caller's API key ('' when the gateway runs open); 401 otherwise."""
    auth = _gw(request).auth
    if not auth.enabled:
        return ""
    tenant = auth.tenant_of(request.headers.get("Authorization"))
    if tenant is None:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": {"code": "unauthorized", "message": "a valid Bearer API key is required"}}),
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


def request_id_of(request: web.Request) -> str:
    request_id = request.match_info["id"]
    try:
        parse_request_id(request_id)
    except ValidationError:
        raise _not_found(request_id) from None
    if request_id_time_ms(request_id) > time.time() * 1000 + FUTURE_ID_MS:
        raise _not_found(request_id)
    return request_id


def _not_found(request_id: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(
        text=json.dumps({"error": {"code": "not_found", "message": f"no request {request_id[:64]!r}"}}),
        content_type="application/json",
    )


async def authorize_read(request: web.Request, request_id: str) -> None:
    """A stream or status is readable with a valid stream token, or with the key that submitted it."""
    gw = _gw(request)
    if not gw.auth.enabled:
        return
    token = request.query.get("token")
    if token is not None and gw.auth.verify(request_id, token):
        return
    tenant = gw.auth.tenant_of(request.headers.get("Authorization"))
    if tenant is None:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": {"code": "unauthorized", "message": "an API key or a valid stream token"}}),
            content_type="application/json",
        )
    owner = gw.tenants.get(request_id) or (await gw.hub.snapshot(request_id)).tenant
    if owner != tenant:
        # Same answer as an unknown id: a key must not learn which ids exist for other tenants.
        raise _not_found(request_id)


def _expired(gw: Gateway, request_id: str) -> bool:
    return request_id_time_ms(request_id) < time.time() * 1000 - gw.settings.events_retention_ms


async def produce_request(gw: Gateway, req: InferenceRequest) -> None:
    try:
        await gw.producer.send_and_wait(
            gw.settings.requests_topic,
            gw.codec.encode(req),
            key=req.request_id.encode(),
            headers=record_headers("InferenceRequest"),
        )
    except TokenRelayError:
        raise
    except Exception as exc:
        raise KafkaUnavailable(f"cannot produce the request: {exc}") from exc
    gw.metrics.requests_submitted.inc()
    if req.tenant:
        gw.tenants[req.request_id] = req.tenant
        if len(gw.tenants) > 100_000:
            gw.tenants.pop(next(iter(gw.tenants)))
    log.info("request %s submitted (tenant %s)", req.request_id, req.tenant or "-")


async def produce_cancel(gw: Gateway, request_id: str, reason: str) -> None:
    event = ControlEvent(request_id, "cancel", int(time.time() * 1000), reason)
    await gw.producer.send_and_wait(
        gw.settings.control_topic,
        gw.codec.encode(event),
        key=request_id.encode(),
        headers=record_headers("ControlEvent"),
    )
    log.info("request %s: cancel sent (%s)", request_id, reason)


def check_backlog(gw: Gateway) -> None:
    backlog = gw.backlog.backlog if gw.backlog is not None else -1
    if backlog > gw.settings.queue_limit:
        raise web.HTTPTooManyRequests(
            text=json.dumps({"error": {"code": "queue_full", "message": f"{backlog} requests are waiting"}}),
            content_type="application/json",
            headers={"Retry-After": "2"},
        )


def new_inference_request(
    prompt: str, sampling: SamplingParams, tenant: str, messages: tuple[ChatMessage, ...] | None = None
) -> InferenceRequest:
    """The record a validated submit becomes, with a fresh UUIDv7 id."""
    return InferenceRequest(
        request_id=new_request_id(),
        prompt=prompt,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        stop=sampling.stop,
        seed=sampling.seed,
        messages=messages,
        tenant=tenant,
        created_ms=int(time.time() * 1000),
    )


# --- native API ---------------------------------------------------------------------------------------------


async def submit(request: web.Request) -> web.Response:
    gw = _gw(request)
    tenant = require_key(request)
    body = await read_json(request)
    # `messages` (chat turns, rendered with the model's chat template) is an optional alternative to `prompt`.
    messages = parse_messages(body) if "messages" in body else None
    prompt = "\n".join(m.content for m in messages) if messages is not None else parse_prompt(body)
    sampling = parse_sampling(body, gw.settings.max_tokens_limit)
    check_backlog(gw)
    req = new_inference_request(prompt, sampling, tenant, messages)
    request_id = req.request_id
    await produce_request(gw, req)
    events_url = f"/v1/requests/{request_id}/events"
    answer: dict[str, Any] = {"id": request_id}
    if gw.auth.enabled:
        token = gw.auth.sign(request_id)
        events_url += f"?token={token}"
        answer["stream_token"] = token
    answer["events_url"] = events_url
    return web.json_response(answer, status=202, headers={"Location": f"/v1/requests/{request_id}"})


def _cursor_of(request: web.Request) -> Cursor | None:
    text = request.headers.get("Last-Event-ID")
    if text is None or text == "":
        text = request.query.get("last_event_id")
    if text is None or text == "":
        return None
    return decode_cursor(text.strip())


async def events(request: web.Request) -> web.StreamResponse:
    gw = _gw(request)
    request_id = request_id_of(request)
    cursor = _cursor_of(request)
    await authorize_read(request, request_id)
    sub = await gw.hub.subscribe(request_id, cursor)
    if sub is None:
        return web.Response(status=204, headers=_cors_headers(request))
    try:
        if _expired(gw, request_id) and not sub.backlog and gw.hub.entry(request_id).view.run_id is None:
            raise _not_found(request_id)
        return await stream_sse(request, gw, sub)
    finally:
        gw.hub.unsubscribe(sub)


async def stream_sse(request: web.Request, gw: Gateway, sub: Subscription) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            **_cors_headers(request),
        }
    )
    transport = request.transport
    if transport is not None and gw.settings.sse_send_buffer > 0:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, gw.settings.sse_send_buffer)
    gw.metrics.active_streams.inc()
    try:
        await response.prepare(request)
        if transport is not None:
            # Dropped as slow: the handler may be blocked in a write to a peer that stopped reading, so close the
            # connection under it (memory and the fd are released now; the client resumes with its cursor).
            if sub.closed == "slow":
                transport.abort()
                return response
            sub.on_slow = transport.abort
        chunk = [PREAMBLE, *sub.preamble, *(o.framed for o in sub.backlog)]
        await response.write(b"".join(chunk))
        gw.metrics.events_delivered.inc(len(sub.backlog))
        if any(o.event.terminal for o in sub.backlog):
            return response
        while True:
            out = await sub.next(gw.settings.keepalive_s)
            if out is None:
                if sub.closed is not None:
                    break  # slow or shutting down: the client resumes with its cursor
                await response.write(KEEPALIVE)
                continue
            # Whatever else is already queued goes out in the same write: one syscall per wake-up, not per event.
            batch = [out]
            while not sub.queue.empty() and not batch[-1].event.terminal:
                batch.append(sub.queue.get_nowait())
            await response.write(b"".join(o.framed for o in batch) if len(batch) > 1 else out.framed)
            now = time.time()
            gw.metrics.events_delivered.inc(len(batch))
            for o in batch:
                gw.metrics.hop_latency.observe(max(0.0, now - o.event.ts_ms / 1000))
            if batch[-1].event.terminal:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        log.debug("request %s: subscriber went away", sub.request_id)
    finally:
        gw.metrics.active_streams.dec()
    return response


async def status(request: web.Request) -> web.Response:
    gw = _gw(request)
    request_id = request_id_of(request)
    await authorize_read(request, request_id)
    view = await gw.hub.snapshot(request_id)
    if view.run_id is None and request_id not in gw.tenants and _expired(gw, request_id):
        raise _not_found(request_id)
    answer: dict[str, Any] = {"id": request_id, "status": view.status, "text": view.text, "model": view.model}
    if view.terminal is not None:
        answer.update(view.terminal.data if view.terminal.event == "done" else {"error": view.terminal.data})
    return web.json_response(answer)


async def cancel(request: web.Request) -> web.Response:
    gw = _gw(request)
    request_id = request_id_of(request)
    await authorize_read(request, request_id)
    await produce_cancel(gw, request_id, "client_request")
    return web.json_response({"id": request_id, "status": "cancelling"}, status=202)


# --- OpenAI-compatible API ----------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=True)


async def _openai(request: web.Request, *, chat: bool) -> web.StreamResponse:
    gw = _gw(request)
    tenant = require_key(request)
    body = await read_json(request)
    parse_n(body)
    stream, include_usage = parse_stream_flags(body)
    messages: tuple[ChatMessage, ...] | None = None
    if chat:
        messages = parse_messages(body)
        prompt = "\n".join(m.content for m in messages)
    else:
        prompt = parse_prompt(body)
    sampling = parse_sampling(body, gw.settings.max_tokens_limit, default_max_tokens=16 if not chat else 256)
    model = body.get("model") or gw.settings.model
    if not isinstance(model, str) or len(model) > 256:
        raise FieldError("model", "must be a string")
    check_backlog(gw)
    req = new_inference_request(prompt, sampling, tenant, messages)
    request_id = req.request_id
    sub = await gw.hub.subscribe(request_id, None)
    assert sub is not None
    try:
        await produce_request(gw, req)
        chunks = _openai_chunks(request, gw, sub)
        if stream:
            return await _openai_stream(request, gw, request_id, model, chat, include_usage, chunks)
        return await _openai_whole(request, gw, request_id, model, chat, chunks)
    finally:
        gw.hub.unsubscribe(sub)


async def _openai_chunks(
    request: web.Request, gw: Gateway, sub: Subscription
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(kind, data) of the request's view; kind 'gone' when the client disconnected, 'dropped' when too slow."""
    for out in sub.backlog:
        yield out.event.event, out.event.data
        if out.event.terminal:
            return
    while True:
        live = await sub.next(DISCONNECT_POLL_S)
        if live is None:
            if sub.closed is not None:
                yield "dropped", {}
                return
            transport = request.transport
            if transport is None or transport.is_closing():
                yield "gone", {}
                return
            continue
        yield live.event.event, live.event.data
        if live.event.terminal:
            return


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _openai_stream(
    request: web.Request,
    gw: Gateway,
    request_id: str,
    model: str,
    chat: bool,
    include_usage: bool,
    chunks: AsyncIterator[tuple[str, dict[str, Any]]],
) -> web.StreamResponse:
    created = int(time.time())
    oid = ("chatcmpl-" if chat else "cmpl-") + request_id
    kind_name = "chat.completion.chunk" if chat else "text_completion"
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **_cors_headers(request),
        }
    )
    response.headers["X-Request-Id"] = request_id

    def chunk(text: str | None, finish: str | None, *, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body: dict[str, Any] = {"id": oid, "object": kind_name, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    gw.metrics.active_streams.inc()
    finished = False
    delivered = ""
    try:
        await response.prepare(request)
        if chat:
            await response.write(chunk("", None, role=True))
        async for kind, data in chunks:
            if kind == "started":
                model = data.get("model") or model
                if data.get("text"):
                    delivered = data["text"]
                    await response.write(chunk(delivered, None))
            elif kind == "token":
                delivered += data["text"]
                await response.write(chunk(data["text"], None))
            elif kind == "restart":
                text = data.get("text", "")
                if text.startswith(delivered):
                    await response.write(chunk(text[len(delivered) :], None))
                    delivered = text
                else:
                    finished = True
                    await _in_band_error(response, "restarted", "generation restarted and cannot be continued")
                    break
            elif kind == "done":
                finished = True
                await response.write(chunk(None if chat else "", _finish_reason(data["finish_reason"])))
                if include_usage:
                    usage = data["usage"]
                    usage_body = {
                        "id": oid,
                        "object": kind_name,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
                    }
                    await response.write(b"data: " + json.dumps(usage_body).encode() + b"\n\n")
                await response.write(b"data: [DONE]\n\n")
            elif kind == "error":
                finished = True
                await _in_band_error(response, data.get("code", "failed"), data.get("message", ""))
            elif kind == "dropped":
                finished = True
                await _in_band_error(response, "too_slow", "the client did not keep up with the stream")
            elif kind == "gone":
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        gw.metrics.active_streams.dec()
        if not finished:
            with contextlib.suppress(Exception):
                await asyncio.shield(produce_cancel(gw, request_id, "client_disconnected"))
    return response


async def _in_band_error(response: web.StreamResponse, code: str, message: str) -> None:
    body = {"error": {"code": code, "message": message, "type": "server_error"}}
    await response.write(b"data: " + json.dumps(body).encode() + b"\n\n" + b"data: [DONE]\n\n")


async def _openai_whole(
    request: web.Request,
    gw: Gateway,
    request_id: str,
    model: str,
    chat: bool,
    chunks: AsyncIterator[tuple[str, dict[str, Any]]],
) -> web.Response:
    text = ""
    finished = False
    try:
        async for kind, data in chunks:
            if kind == "started":
                model = data.get("model") or model
                text = data.get("text", "")
            elif kind == "token":
                text += data["text"]
            elif kind == "restart":
                text = data.get("text", "")
            elif kind == "done":
                finished = True
                usage = dict(data["usage"])
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                reason = _finish_reason(data["finish_reason"])
                choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                body = {
                    "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
                return web.json_response(body, headers={"X-Request-Id": request_id})
            elif kind == "error":
                finished = True
                return error_response(502, data.get("code", "failed"), data.get("message", ""))
            elif kind in ("gone", "dropped"):
                break
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                await asyncio.shield(produce_cancel(gw, request_id, "client_disconnected"))
    return error_response(499, "client_closed", "client went away")


async def models(request: web.Request) -> web.Response:
    gw = _gw(request)
    require_key(request)
    names = sorted({gw.settings.model, *gw.hub.models})
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "tokenrelay"} for name in names]
    return web.json_response({"object": "list", "data": data})


# --- operations ---------------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = _gw(request)
    ok = gw.hub.started.is_set()
    if ok and gw.ready_check is not None:
        try:
            ok = await asyncio.wait_for(gw.ready_check(), 5.0)
        except Exception as exc:
            log.info("not ready: %s", exc)
            ok = False
    return web.json_response({"status": "ready" if ok else "not_ready"}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    gw = _gw(request)
    return web.Response(body=gw.metrics.render(), content_type="text/plain", charset="utf-8")


async def playground(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def build_app(gateway: Gateway) -> web.Application:
    """The routes over an assembled Gateway (its hub and producer are started by the caller)."""
    app = web.Application(
        client_max_size=gateway.settings.max_body_bytes,
        middlewares=[cors_middleware(gateway.settings.cors_origins), errors_middleware],
    )
    app[GATEWAY] = gateway
    app.router.add_post("/v1/requests", submit)
    app.router.add_get("/v1/requests/{id}/events", events)
    app.router.add_get("/v1/requests/{id}", status)
    app.router.add_post("/v1/requests/{id}/cancel", cancel)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", playground)
    pages.add_routes(app)
    return app

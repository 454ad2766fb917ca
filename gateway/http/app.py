"""The aiohttp application: routes, the error and CORS middleware, and the operational endpoints."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.api import native, openai, responses
from gateway.api.context import GATEWAY, Gateway, error_body, gateway_of
from gateway.http import pages
from schemas.errors import BodyTooLarge, TokenRelayError
from services import tracing
from services.logs import request_context

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": body}, status=status, headers=headers)


def render_error(exc: TokenRelayError) -> web.Response:
    """The one place a project error becomes an HTTP answer: JSON ``{"error": {code, message}}``, status, headers."""
    return error_response(exc.http_status, error_body(exc), exc.headers())


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # A handler that learns its request id binds it for its log lines (``bind_request``); this scope ends with it.
    with request_context(None):
        return await _answer_errors(request, handler)


async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return render_error(BodyTooLarge("request body is too large"))
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            # Keep headers such as Allow; the body's own Content-Type/Length would clash with the JSON body.
            headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
            return error_response(
                exc.status, {"code": exc.reason.lower().replace(" ", "_"), "message": exc.reason}, headers
            )
        raise
    except TokenRelayError as exc:
        if exc.http_status >= 500 and exc.http_status != 502:
            log.warning("%s %s: %s: %s", request.method, request.path, exc.code, exc.message)
        return render_error(exc)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render_error(TokenRelayError("internal error"))


def cors_middleware(origins: tuple[str, ...]) -> Any:
    allow_any = "*" in origins

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 once a request can be served: Kafka and topics there, and a live worker for every model announced (and
    at least one). Why not, when not; the models themselves only for a caller with a key (or an open gateway)."""
    gw = gateway_of(request)
    reason = "" if gw.relay.started.is_set() else "starting"
    if not reason and gw.ready_check is not None:
        try:
            reason = await asyncio.wait_for(gw.ready_check(), 5.0)
        except Exception as exc:
            log.info("not ready: %s", exc)
            reason = "kafka"
    now = int(time.time() * 1000)
    live = gw.models.live(now)
    unavailable = gw.models.unavailable(now)
    if not reason and unavailable:
        reason = "model_unavailable"
    if not reason and not live:
        reason = "no_model"
    body: dict[str, Any] = {"status": "not_ready", "reason": reason} if reason else {"status": "ready"}
    if not gw.auth.enabled or gw.auth.tenant_of(request.headers.get("Authorization")) is not None:
        body["models"] = {name: model.workers for name, model in live.items()}
        body["unavailable_models"] = unavailable
    return web.json_response(body, status=503 if reason else 200)


async def metrics(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    return web.Response(body=gw.metrics.render(), content_type="text/plain", charset="utf-8")


async def playground(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer of the API says where its key stands against its quotas (OpenAI's ``x-ratelimit-*``), 429s and
    streams included: this runs as the headers go out, whoever prepared the response."""
    gw = gateway_of(request)
    if gw.quotas is None or not request.path.startswith("/v1/"):
        return
    tenant = gw.auth.tenant_of(request.headers.get("Authorization")) if gw.auth.enabled else ""
    if tenant is not None:
        response.headers.update(gw.quotas.headers(tenant))


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tracing on: the W3C context the client sent (``traceparent``) is current while its request is handled, so a
    submit span is its child."""
    with tracing.attached(tracing.http_trace(request.headers)):
        return await handler(request)


def build_app(gateway: Gateway) -> web.Application:
    """The routes over an assembled Gateway (its relay and producer are started by the caller)."""
    middlewares = [cors_middleware(gateway.settings.cors_origins), errors_middleware]
    if tracing.enabled():
        middlewares.append(trace_middleware)
    app = web.Application(client_max_size=gateway.settings.max_body_bytes, middlewares=middlewares)
    app[GATEWAY] = gateway
    app.on_response_prepare.append(ratelimit_headers)
    app.router.add_post("/v1/requests", native.submit)
    app.router.add_get("/v1/requests/{id}/events", native.events)
    app.router.add_get("/v1/requests/{id}", native.status)
    app.router.add_post("/v1/requests/{id}/cancel", native.cancel)
    app.router.add_post("/v1/completions", openai.completions)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_get("/v1/models", openai.models)
    responses.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", playground)
    pages.add_routes(app)
    return app

"""OpenAI Responses API handlers: create, retrieve (streamed from any event on), cancel; durable through the log."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.api.auth import CANCEL, WATCH
from gateway.api.context import (
    FUTURE_ID_MS,
    Gateway,
    authorize_read,
    check_backlog,
    check_limits,
    client_of,
    cors_headers,
    gateway_of,
    parse_model,
    produce_cancel,
    produce_request,
    read_json,
    refresh_routes,
    require_key,
    resolve_model,
)
from gateway.api.openai import TOO_SLOW, AnswerFold, cancel_quietly, follow, tools_called
from gateway.api.responses_body import CreateSpec, parse_create
from gateway.api.responses_events import RESPONSE_PREFIX, ResponseEvents, ResponseOptions, response_id
from gateway.api.validation import PRIORITY_HEADER, parse_priority
from schemas.errors import ClientClosed, Conflict, FieldError, NotFound, ValidationError, ended_with
from schemas.ids import parse_request_id, request_id_time_ms
from schemas.records import Accepted, InferenceRequest
from schemas.view import EventName, View, ViewEvent
from services.logs import bind_request
from services.requests import new_inference_request

log = logging.getLogger(__name__)

# A request the log does not show yet while its id is younger than this may still be on its way to this gateway's relay
# (the Accepted record is produced before the create call answers, but read by every relay asynchronously).
ACCEPT_GRACE_MS = 10_000
ACCEPT_POLL_S = 0.05
# How long a cancel waits for the worker's terminal event, so that its answer says what happened.
CANCEL_WAIT_S = 10.0


def request_id_of_response(text: str) -> str:
    """The request id behind a response id; NotFound unless it is ``resp_`` and the 32 hex digits of a UUIDv7."""
    hex_part = text.removeprefix(RESPONSE_PREFIX)
    if hex_part == text or len(hex_part) != 32:
        raise NotFound(f"no response {text[:80]!r}")
    try:
        request_id = str(uuid.UUID(hex=hex_part))
        parse_request_id(request_id)
    except (ValueError, ValidationError):
        raise NotFound(f"no response {text[:80]!r}") from None
    if hex_part != hex_part.lower() or request_id_time_ms(request_id) > time.time() * 1000 + FUTURE_ID_MS:
        raise NotFound(f"no response {text[:80]!r}")
    return request_id


# --- answering -----------------------------------------------------------------------------------------------------


async def create(request: web.Request) -> web.StreamResponse:
    gw = gateway_of(request)
    tenant = require_key(request)
    body = await read_json(request)
    await refresh_routes(gw, parse_model(body))
    priority = parse_priority(body, request.headers.get(PRIORITY_HEADER))
    spec, req, accepted = response_request(gw, body, tenant, priority)
    check_backlog(gw, req.model)
    called = tools_called(req)
    options = ResponseOptions(
        req.model, spec.background, spec.store, spec.metadata, tuple(called) if called is not None else None
    )
    surface = ResponseEvents(AnswerFold(req.model), req.request_id, options)
    if spec.background and not spec.stream:
        await produce_request(gw, req, accepted)
        answer = surface.object()
        if gw.auth.enabled:  # for a browser's EventSource, which cannot send an Authorization header
            answer["stream_token"] = gw.auth.sign(req.request_id, tenant)
        return web.json_response(answer, headers={"X-Request-Id": req.request_id})
    sub = await gw.relay.subscribe(req.request_id, None)
    assert sub is not None  # no cursor: a subscription always starts
    try:
        await produce_request(gw, req, accepted)
        events = follow(request, sub)
        if spec.stream:
            # A foreground stream's client that leaves cancels the response; a background one keeps running.
            return await _stream(request, gw, surface, events, foreground=not spec.background)
        return await _whole(gw, surface, events)
    finally:
        gw.relay.unsubscribe(sub)


def response_request(
    gw: Gateway, body: dict[str, Any], tenant: str, priority: str = "interactive"
) -> tuple[CreateSpec, InferenceRequest, Accepted]:
    """What a ``/v1/responses`` body becomes, checked against the model's limits: the parsed options, the record and
    its Accepted (background, store, metadata); the endpoint's, and each line's of a Batch API file."""
    spec = parse_create(body, gw.settings.max_tokens_limit)
    model = resolve_model(gw, parse_model(body))
    check_limits(model, spec.sampling, spec.messages)
    # The text travels once, in `messages`.
    req = new_inference_request("", spec.sampling, tenant, spec.messages, model=model.name, priority=priority)
    accepted = Accepted(
        model.name, tenant, req.deadline_ms, spec.background, spec.store, spec.metadata, priority=req.priority
    )
    return spec, req, accepted


async def _stream(
    request: web.Request,
    gw: Gateway,
    surface: ResponseEvents,
    events: AsyncIterator[ViewEvent | None],
    *,
    foreground: bool = False,
) -> web.StreamResponse:
    """Stream the surface's frames; a foreground stream's client that leaves cancels the response.

    A foreground stream sends its headers with the first event, so that a request the worker refuses is an HTTP
    error, as for the other OpenAI endpoints; a background one at once, so that its client has the id to resume with.
    """
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Request-Id": surface.request_id,
            **cors_headers(request),
        }
    )
    gw.metrics.active_streams.inc()
    try:
        if not foreground:
            await _open(request, response, surface)
        async for ev in events:
            if not response.prepared:
                _refuse_early(surface, ev)
                await _open(request, response, surface)
            if ev is None:  # dropped as too slow: a background client resumes with starting_after
                if foreground:
                    await response.write(surface.connection_error(TOO_SLOW.code, TOO_SLOW.message))
                break
            if frames := surface.feed(ev):
                await response.write(frames)
            if surface.ended:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        gw.metrics.active_streams.dec()
        if not surface.ended and foreground:
            await cancel_quietly(gw, surface.request_id)
    return response


async def _open(request: web.Request, response: web.StreamResponse, surface: ResponseEvents) -> None:
    await response.prepare(request)
    if opening := surface.opening():
        await response.write(opening)


def _refuse_early(surface: ResponseEvents, ev: ViewEvent | None) -> None:
    """An error before anything was answered is the HTTP answer (400 for the request's fault, else 502)."""
    if ev is not None and ev.event == EventName.ERROR:
        surface.feed(ev)
        raise ended_with(ev.data.get("code", "failed"), ev.data.get("message", ""))


def whole_step(surface: ResponseEvents, ev: ViewEvent) -> dict[str, Any] | None:
    """One view event into the whole response object: the object once the response ended, None before; the
    request's error (``ended_with``) when it failed before anything was answered. The endpoint's answer and a Batch
    API line's body."""
    _refuse_early(surface, ev)
    surface.feed(ev)
    return surface.object() if surface.ended else None


async def _whole(gw: Gateway, surface: ResponseEvents, events: AsyncIterator[ViewEvent | None]) -> web.Response:
    try:
        async for ev in events:
            if ev is None:
                break
            body = whole_step(surface, ev)
            if body is not None:
                return web.json_response(body, headers={"X-Request-Id": surface.request_id})
    finally:
        if not surface.ended:
            await cancel_quietly(gw, surface.request_id)
    raise ClientClosed("client went away")


async def _known_view(request: web.Request, request_id: str, scope: int = WATCH) -> View:
    """The request's view once the log shows it (a young id may still be on its way); NotFound otherwise.

    A response's Accepted is its first record in its partition and retention deletes a partition's oldest records
    first: while the Accepted is in the log, every later event is too, so the numbering cannot shift. A request
    without it that is older than the retention window may have lost its beginning: that is refused as expired.
    """
    gw = gateway_of(request)
    if gw.auth.enabled and "token" not in request.query:
        require_key(request)  # before any waiting
    created_ms = request_id_time_ms(request_id)
    client = client_of(request)  # every look-up scans on its caller's share, never on one common to all callers
    while True:
        view = await gw.relay.snapshot(request_id, client)
        if view.known or time.time() * 1000 >= created_ms + ACCEPT_GRACE_MS:
            break
        await asyncio.sleep(ACCEPT_POLL_S)
    if view.known:
        await authorize_read(request, request_id, scope)
    if view.log.accepted is None and created_ms < time.time() * 1000 - gw.settings.events_retention_ms:
        raise NotFound(f"response {response_id(request_id)} is older than the log's retention window", code="expired")
    if not view.known:
        raise NotFound(f"no response {response_id(request_id)}")
    if not ResponseOptions.of_view(view, gw.settings.default_model).store:
        raise NotFound(f"no response {response_id(request_id)} (created with store=false)")
    return view


def _starting_after(request: web.Request) -> int:
    text = request.query.get("starting_after") or request.headers.get("Last-Event-ID") or "-1"
    try:
        value = int(text)
    except ValueError:
        raise FieldError("starting_after", "must be an integer") from None
    if value < -1:
        raise FieldError("starting_after", "must be -1 or more")
    return value


def _query_bool(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise FieldError(name, "must be true or false")
    return value in ("true", "1")


async def retrieve(request: web.Request) -> web.StreamResponse:
    gw = gateway_of(request)
    request_id = request_id_of_response(request.match_info["id"])
    bind_request(request_id)
    stream = _query_bool(request, "stream")
    after = _starting_after(request) if stream else -1
    view = await _known_view(request, request_id)
    options = ResponseOptions.of_view(view, gw.settings.default_model)
    surface = ResponseEvents(AnswerFold(options.model), request_id, options, after=after)
    sub = await gw.relay.subscribe(request_id, None, client_of(request))
    assert sub is not None
    try:
        if stream and "starting_after" not in request.query and "Last-Event-ID" in request.headers:
            # An EventSource reconnecting after the last event: 204 tells it to stop (as the native stream does).
            scratch = ResponseEvents(AnswerFold(options.model), request_id, options, after=after)
            scratch.opening()
            for out in sub.backlog:
                scratch.feed(out.event)
            if scratch.ended and scratch.seq - 1 <= after:
                return web.Response(status=204, headers=cors_headers(request))
        if stream:
            return await _stream(request, gw, surface, follow(request, sub), foreground=False)
        for out in sub.backlog:
            surface.feed(out.event)
        return web.json_response(surface.object())
    finally:
        gw.relay.unsubscribe(sub)


async def cancel(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    request_id = request_id_of_response(request.match_info["id"])
    bind_request(request_id)
    view = await _known_view(request, request_id, CANCEL)
    options = ResponseOptions.of_view(view, gw.settings.default_model)
    if not options.background:
        raise Conflict("only background responses can be cancelled", code="not_background")
    surface = ResponseEvents(AnswerFold(options.model), request_id, options)
    sub = await gw.relay.subscribe(request_id, None, client_of(request))
    assert sub is not None
    try:
        for out in sub.backlog:
            surface.feed(out.event)
        if not surface.ended:  # cancelling an ended response answers it as it is (idempotent)
            await produce_cancel(gw, request_id, "client_request")
            deadline = time.monotonic() + CANCEL_WAIT_S
            while not surface.ended and (left := deadline - time.monotonic()) > 0:
                live = await sub.next(left)
                if live is None:
                    break
                surface.feed(live.event)
        return web.json_response(surface.object())
    finally:
        gw.relay.unsubscribe(sub)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{id}", retrieve)
    app.router.add_post("/v1/responses/{id}/cancel", cancel)

"""OpenAI Responses API handlers: create, retrieve (streamed from any event on), cancel; durable through the log."""

from __future__ import annotations

import asyncio
import json
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
    produce_event,
    produce_request,
    read_json,
    refresh_routes,
    require_key,
    resolve_model,
)
from gateway.api.delivery import first_byte
from gateway.api.openai import TOO_SLOW, AnswerFold, cancel_quietly, follow, follow_streamed
from gateway.api.responses_body import CreateSpec, parse_create
from gateway.api.responses_events import RESPONSE_PREFIX, ResponseEvents, ResponseOptions, item_id, response_id
from gateway.api.validation import PRIORITY_HEADER, parse_priority
from gateway.fanout.subscription import Subscription
from schemas.errors import ClientClosed, Conflict, FieldError, NotFound, Unsupported, ValidationError, ended_with
from schemas.ids import parse_request_id, request_id_time_ms
from schemas.records import Accepted, Deleted, InferenceRequest, TokenEvent
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
    previous = body.get("previous_response_id")
    earlier = await previous_conversation(request, previous) if isinstance(previous, str) else []
    spec, req, accepted = response_request(gw, body, tenant, priority, earlier)
    check_backlog(gw, req.model)
    surface = ResponseEvents(AnswerFold(req.model), req.request_id, ResponseOptions.of_accepted(accepted, req.model))
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
        if spec.stream:
            # A foreground stream's client that leaves cancels the response; a background one keeps running.
            return await _stream(request, gw, surface, sub, foreground=not spec.background)
        return await _whole(gw, surface, follow(request, sub))
    finally:
        gw.relay.unsubscribe(sub)


def response_request(
    gw: Gateway,
    body: dict[str, Any],
    tenant: str,
    priority: str = "interactive",
    earlier: list[dict[str, Any]] | None = None,
) -> tuple[CreateSpec, InferenceRequest, Accepted]:
    """What a ``/v1/responses`` body becomes, checked against the model's limits: the parsed options, the record and
    its Accepted (background, store, metadata, the options the object echoes and the whole input as items); the
    endpoint's, and each line's of a Batch API file (``earlier`` None: previous_response_id is refused there).
    ``earlier`` holds the items of the previous response's conversation (``previous_conversation``)."""
    spec = parse_create(body, gw.settings.max_tokens_limit)
    if spec.previous_response_id is not None and earlier is None:
        raise Unsupported("previous_response_id", "previous_response_id is not supported in a batch")
    earlier = earlier or []
    messages = spec.conversation(earlier)
    model = resolve_model(gw, parse_model(body))
    check_limits(model, spec.sampling, messages)
    # The text travels once, in `messages`.
    req = new_inference_request("", spec.sampling, tenant, messages, model=model.name, priority=priority)
    own = [{"id": f"{item_id(req.request_id)}_{i}", **item} for i, item in enumerate(spec.items)]
    accepted = Accepted(
        model.name,
        tenant,
        req.deadline_ms,
        spec.background,
        spec.store,
        spec.metadata,
        priority=req.priority,
        response=json.dumps(spec.echo, ensure_ascii=False, separators=(",", ":")),
        input_items=json.dumps([*earlier, *own], ensure_ascii=False, separators=(",", ":")),
    )
    return spec, req, accepted


async def previous_conversation(request: web.Request, previous: str) -> list[dict[str, Any]]:
    """The items a response continuing ``previous`` starts from, read from the log: the earlier response's whole
    input and its output message. 404 ``previous_response_not_found`` when the log does not hold it (any more)."""
    try:
        view = await _known_view(request, request_id_of_response(previous))
    except NotFound:
        raise NotFound(f"previous response {previous[:80]!r} not found", code="previous_response_not_found") from None
    accepted = view.log.accepted
    if accepted is None or accepted.input_items is None:
        raise NotFound(
            f"previous response {previous[:80]!r} was not created by the Responses API",
            code="previous_response_not_found",
        )
    if view.terminal is None:
        raise Conflict(f"previous response {previous[:80]!r} has not ended yet", code="previous_response_in_progress")
    items: list[dict[str, Any]] = json.loads(accepted.input_items)
    if view.terminal.event == EventName.DONE and view.text:
        output = {"type": "output_text", "text": view.text, "annotations": []}
        rid = view.request_id
        items.append(
            {"id": item_id(rid), "type": "message", "role": "assistant", "content": [output], "status": "completed"}
        )
    return items


async def _stream(
    request: web.Request,
    gw: Gateway,
    surface: ResponseEvents,
    sub: Subscription,
    *,
    foreground: bool = False,
    resumed: bool = False,
) -> web.StreamResponse:
    """Stream the surface's frames; a foreground stream's client that leaves cancels the response. An idle stream
    gets a keep-alive comment every ``TOKENRELAY_KEEPALIVE_S``, as the native one does.

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
    events = follow_streamed(request, sub, response, gw.settings.keepalive_s)
    gw.metrics.active_streams.inc()
    delivery = first_byte(request, gw, surface.request_id, resumed=resumed, api="responses")
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
                if delivery is not None:
                    delivery.wrote(ev)
            if surface.ended:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        gw.metrics.active_streams.dec()
        if delivery is not None:
            delivery.close()
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
    if not view.known or view.log.deleted is not None:
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
            return await _stream(request, gw, surface, sub, resumed=after >= 0)
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


async def delete(request: web.Request) -> web.Response:
    """Delete a stored response: a Deleted record in its log (every gateway answers 404 for it from then on); a
    response still running is cancelled first. Answers once this gateway's relay has read the record back."""
    gw = gateway_of(request)
    request_id = request_id_of_response(request.match_info["id"])
    view = await _known_view(request, request_id, CANCEL)
    if view.terminal is None:
        await produce_cancel(gw, request_id, "deleted")
    await produce_event(gw, TokenEvent(request_id, "", 0, int(time.time() * 1000), Deleted(view.tenant)))
    deadline = time.monotonic() + CANCEL_WAIT_S
    client = client_of(request)
    while view.log.deleted is None and time.monotonic() < deadline:
        await asyncio.sleep(ACCEPT_POLL_S)
        view = await gw.relay.snapshot(request_id, client)
    return web.json_response({"id": response_id(request_id), "object": "response.deleted", "deleted": True})


MAX_ITEMS_PAGE = 100


async def input_items(request: web.Request) -> web.Response:
    """The whole input of a response as items (``order`` desc by default, ``after`` an item id, ``limit`` 1-100)."""
    request_id = request_id_of_response(request.match_info["id"])
    view = await _known_view(request, request_id)
    accepted = view.log.accepted
    items: list[dict[str, Any]] = json.loads(accepted.input_items) if accepted and accepted.input_items else []
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise FieldError("order", "must be asc or desc")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise FieldError("limit", "must be an integer") from None
    if not 1 <= limit <= MAX_ITEMS_PAGE:
        raise FieldError("limit", f"must be between 1 and {MAX_ITEMS_PAGE}")
    if order == "desc":
        items.reverse()
    after = request.query.get("after")
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise FieldError("after", f"no item {after[:80]!r} in this response's input")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{id}", retrieve)
    app.router.add_delete("/v1/responses/{id}", delete)
    app.router.add_get("/v1/responses/{id}/input_items", input_items)
    app.router.add_post("/v1/responses/{id}/cancel", cancel)

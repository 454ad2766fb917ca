"""The native API: submit a request, stream its SSE events (with resume), read its status, cancel it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any

from aiohttp import web

from gateway.api.auth import CANCEL, WATCH
from gateway.api.context import (
    Gateway,
    authorize_read,
    check_backlog,
    check_limits,
    client_of,
    cors_headers,
    gateway_of,
    not_found,
    parse_model,
    produce_cancel,
    produce_request,
    read_json,
    refresh_routes,
    request_id_of,
    require_key,
    require_known,
    resolve_model,
)
from gateway.api.delivery import FirstByte, first_byte
from gateway.api.validation import (
    NATIVE_SAMPLING_NAMES,
    PRIORITY_HEADER,
    parse_deadline,
    parse_messages,
    parse_priority,
    parse_prompt,
    parse_sampling,
)
from gateway.cluster.peers import NONCE_HEADER, PEER_HEADER, PROOF_HEADER
from gateway.cluster.upstream import FORWARDED_HEADER
from gateway.fanout.cursor import Cursor, decode_cursor
from gateway.fanout.sse import KEEPALIVE, PREAMBLE, frame
from gateway.fanout.subscription import Subscription
from schemas.view import EventName
from services import tracing
from services.requests import new_inference_request

log = logging.getLogger(__name__)


async def submit(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    tenant = require_key(request)
    body = await read_json(request)
    # `messages` (chat turns, rendered with the model's chat template) is an optional alternative to `prompt`.
    messages = parse_messages(body) if "messages" in body else None
    prompt = parse_prompt(body) if messages is None else ""  # a chat request's text travels once, in `messages`
    sampling = parse_sampling(body, gw.settings.max_tokens_limit, names=NATIVE_SAMPLING_NAMES)
    requested = parse_model(body)
    await refresh_routes(gw, requested)
    model = resolve_model(gw, requested)
    check_limits(model, sampling, messages)
    check_backlog(gw, model.name)
    priority = parse_priority(body, request.headers.get(PRIORITY_HEADER))
    deadline_ms = parse_deadline(body, int(time.time() * 1000))
    req = new_inference_request(
        prompt, sampling, tenant, messages, model=model.name, priority=priority, deadline_ms=deadline_ms
    )
    request_id = req.request_id
    await produce_request(gw, req)
    events_url = f"/v1/requests/{request_id}/events"
    answer: dict[str, Any] = {"id": request_id}
    if gw.auth.enabled:
        token = gw.auth.sign(request_id, tenant)
        events_url += f"?token={token}"
        answer["stream_token"] = token
        answer["cancel_token"] = gw.auth.sign(request_id, tenant, WATCH | CANCEL)
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
    gw = gateway_of(request)
    request_id = request_id_of(request)
    cursor = _cursor_of(request)
    # Another gateway following a request this one reads proves it is one of the cluster's gateways (any API keys).
    if not gw.peers.is_peer(request_id, request.headers.get(PEER_HEADER)):
        await authorize_read(request, request_id)
    forwarded = FORWARDED_HEADER in request.headers
    headers = cors_headers(request)
    if (nonce := request.headers.get(NONCE_HEADER)) is not None:
        headers[PROOF_HEADER] = gw.peers.prove(nonce, request_id)  # so that a follower trusts this answer
    sub = await gw.relay.subscribe(request_id, cursor, client_of(request), forwarded=forwarded)
    if sub is None:
        return web.Response(status=204, headers=headers)
    try:
        if sub.error is None:
            require_known(gw, request_id, bool(sub.backlog) or gw.relay.entry(request_id).view.known)
        if forwarded:  # the follower delivers: it learns the request's trace context from this answer
            headers.update(tracing.as_http(gw.relay.trace_of(request_id)))
            return await stream_sse(request, gw, sub, headers)
        delivery = first_byte(request, gw, request_id, resumed=cursor is not None, api="native")
        return await stream_sse(request, gw, sub, headers, delivery)
    finally:
        gw.relay.unsubscribe(sub)


async def stream_sse(
    request: web.Request,
    gw: Gateway,
    sub: Subscription,
    headers: dict[str, str] | None = None,
    delivery: FirstByte | None = None,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            **(cors_headers(request) if headers is None else headers),
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
        if delivery is not None and delivery.pending:
            delivery.wrote_all(o.event for o in sub.backlog)
        gw.metrics.events_delivered.inc(len(sub.backlog))
        if any(o.event.terminal for o in sub.backlog):
            return response
        while True:
            out = await sub.next(gw.settings.keepalive_s)
            if out is None:
                if sub.error is not None:  # no cursor: the client may resume from its last one elsewhere
                    await response.write(frame(EventName.ERROR, json.dumps(sub.error)))
                if sub.closed is not None:
                    break  # slow or shutting down: the client resumes with its cursor
                await response.write(KEEPALIVE)
                continue
            # Whatever else is already queued goes out in the same write: one syscall per wake-up, not per event.
            batch = [out]
            while not sub.queue.empty() and not batch[-1].event.terminal:
                batch.append(sub.queue.get_nowait())
            await response.write(b"".join(o.framed for o in batch) if len(batch) > 1 else out.framed)
            if delivery is not None and delivery.pending:
                delivery.wrote_all(o.event for o in batch)
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
        if delivery is not None:
            delivery.close()
    return response


async def status(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    request_id = request_id_of(request)
    await authorize_read(request, request_id)
    return web.json_response(await _state(gw, request_id, client_of(request)))


async def _state(gw: Gateway, request_id: str, client: str) -> dict[str, Any]:
    """The request as the log has it; 404 when the log holds nothing of it (no Accepted, no run)."""
    view = await gw.relay.snapshot(request_id, client)
    if not view.known and request_id not in gw.tenants:
        raise not_found(request_id)
    answer: dict[str, Any] = {"id": request_id, "status": view.status, "priority": view.priority}
    answer.update(text=view.text, model=view.model)
    if view.terminal is not None:
        done = view.terminal.event == EventName.DONE
        answer.update(view.terminal.data if done else {"error": view.terminal.data})
    return answer


async def cancel(request: web.Request) -> web.Response:
    """202 while the cancel is on its way; 200 with the final state when the request has already ended; 404."""
    gw = gateway_of(request)
    request_id = request_id_of(request)
    await authorize_read(request, request_id, CANCEL)
    state = await _state(gw, request_id, client_of(request))
    if state["status"] in ("done", "failed"):
        return web.json_response(state)
    await produce_cancel(gw, request_id, "client_request")
    return web.json_response({"id": request_id, "status": "cancelling"}, status=202)

"""OpenAI Responses API: the answer fold shaped as numbered Responses events, durable and resumable from the log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.context import (
    FUTURE_ID_MS,
    Gateway,
    authorize_read,
    check_backlog,
    check_limits,
    cors_headers,
    gateway_of,
    new_inference_request,
    parse_model,
    produce_cancel,
    produce_request,
    read_json,
    require_key,
    resolve_model,
)
from gateway.openai import TOO_SLOW, AnswerFold, Completed, Failed, Rewritten, TextDelta, cancel_quietly, follow
from gateway.sse import frame
from gateway.validation import CHAT_ROLES, parse_sampling
from gateway.view import EventName, View, ViewEvent
from schemas.errors import ClientClosed, Conflict, FieldError, NotFound, Unsupported, ValidationError, ended_with
from schemas.ids import parse_request_id, request_id_time_ms
from schemas.records import Accepted, ChatMessage
from schemas.sampling import SamplingParams

log = logging.getLogger(__name__)

RESPONSE_PREFIX = "resp_"
ITEM_PREFIX = "msg_"
# A request the log does not show yet while its id is younger than this may still be on its way to this gateway's hub
# (the Accepted record is produced before the create call answers, but read by every hub asynchronously).
ACCEPT_GRACE_MS = 10_000
ACCEPT_POLL_S = 0.05
# How long a cancel waits for the worker's terminal event, so that its answer says what happened.
CANCEL_WAIT_S = 10.0
MAX_METADATA = 16
MAX_INPUT_ITEMS = 256


# --- ids: a response id is the request id, spelled the OpenAI way (no gateway state maps one to the other) ---------


def response_id(request_id: str) -> str:
    return RESPONSE_PREFIX + uuid.UUID(request_id).hex


def item_id(request_id: str) -> str:
    return ITEM_PREFIX + uuid.UUID(request_id).hex


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


# --- what a response echoes, from the create body or from the log's Accepted record ----------------------------


@dataclass(frozen=True, slots=True)
class ResponseOptions:
    """The options a response object shows; recorded in the request's Accepted event so every gateway knows them."""

    model: str
    background: bool = False
    store: bool = True
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of_view(cls, view: View, default_model: str) -> ResponseOptions:
        accepted = view.log.accepted
        if accepted is None:  # submitted another way (native API, straight onto Kafka): the defaults
            return cls(view.model or default_model)
        return cls(accepted.model or default_model, accepted.background, accepted.store, dict(accepted.metadata))


# --- the surface: view events -> numbered Responses events and the response object (pure) -------------------------


@dataclass(slots=True)
class ResponseEvents:
    """``/v1/responses``: the answer fold's steps as Responses events, numbered from 0 in log order.

    The numbering depends only on the request's view events, which depend only on its log: every replay, from any
    gateway, numbers the same events the same way. Events numbered ``after`` or lower are counted but not framed,
    which is how ``starting_after`` resumes.
    """

    fold: AnswerFold
    request_id: str
    options: ResponseOptions
    after: int = -1
    seq: int = 0
    status: str = ""
    begun: bool = False
    ended: bool = False
    usage: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    incomplete: dict[str, str] | None = None
    item_status: str = "in_progress"

    def __post_init__(self) -> None:
        self.status = self.status or ("queued" if self.options.background else "in_progress")

    # Surface
    def opening(self) -> bytes:
        return self._emit("response.created", {"response": self.object()})

    def delta(self, text: str) -> bytes:
        out = b"" if self.begun else self._begin()
        return out + self._emit("response.output_text.delta", {**self._where(), "delta": text, "logprobs": []})

    def completed(self, end: Completed) -> bytes:
        return self._finish(end, cancelled=False)

    def failed(self, code: str, message: str) -> bytes:
        self.ended = True
        self.status, self.error = "failed", {"code": code, "message": message}
        if self.begun:
            self.item_status = "incomplete"
        return self._emit("response.failed", {"response": self.object()})

    def whole(self, end: Completed) -> dict[str, Any]:
        self.completed(end)
        return self.object()

    # the fold
    def feed(self, ev: ViewEvent) -> bytes:
        """Frames for one view event (nothing for those numbered ``after`` or lower); ``ended`` after the last."""
        if self.ended:
            return b""
        out = b""
        if ev.event == EventName.STARTED and not self.begun:
            out += self._begin()
        step = self.fold.feed(ev.event, ev.data)
        if isinstance(step, TextDelta):
            out += self.delta(step.text) if step.text else b""
        elif isinstance(step, Completed):
            out += self._finish(step, cancelled=ev.data.get("finish_reason") == "cancelled")
        elif isinstance(step, Failed):
            out += self.failed(step.code, step.message)
        elif isinstance(step, Rewritten):  # a stream cannot take back what it sent; the object agrees with it
            out += self.failed("restarted", "generation restarted and cannot be continued")
        return out

    def connection_error(self, code: str, message: str) -> bytes:
        """An ``error`` event that ends this connection, not the response: the log does not number it.

        It takes the next number without consuming it, so a resume (with that number or the one before) loses nothing.
        """
        body = {"type": "error", "sequence_number": self.seq, "code": code, "message": message, "param": None}
        return frame("error", json.dumps(body, ensure_ascii=False, separators=(",", ":")))

    def object(self) -> dict[str, Any]:
        """The response object as of the events folded so far."""
        return {
            "id": response_id(self.request_id),
            "object": "response",
            "created_at": request_id_time_ms(self.request_id) // 1000,
            "status": self.status,
            "background": self.options.background,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": None,
            "max_output_tokens": None,
            "metadata": dict(self.options.metadata),
            "model": self.fold.model,
            "output": [self._item(self.item_status, self.fold.text)] if self.begun else [],
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "reasoning": None,
            "store": self.options.store,
            "temperature": None,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": None,
            "truncation": "disabled",
            "usage": self.usage,
            "user": None,
        }

    def _begin(self) -> bytes:
        self.begun = True
        self.status = "in_progress"
        out = self._emit("response.in_progress", {"response": self.object()})
        out += self._emit("response.output_item.added", {"output_index": 0, "item": self._item("in_progress", None)})
        return out + self._emit("response.content_part.added", {**self._where(), "part": self._part("")})

    def _finish(self, end: Completed, *, cancelled: bool) -> bytes:
        self.ended = True
        self.usage = {
            "input_tokens": end.usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": end.usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": end.usage["total_tokens"],
        }
        if cancelled:
            self.status, self.item_status, kind = "cancelled", "incomplete", "response.cancelled"
        elif end.finish_reason == "length":
            self.status, self.item_status, kind = "incomplete", "incomplete", "response.incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
        else:
            self.status, self.item_status, kind = "completed", "completed", "response.completed"
        out = b""
        if self.begun:
            text = self.fold.text
            out += self._emit("response.output_text.done", {**self._where(), "text": text, "logprobs": []})
            out += self._emit("response.content_part.done", {**self._where(), "part": self._part(text)})
            item = self._item(self.item_status, text)
            out += self._emit("response.output_item.done", {"output_index": 0, "item": item})
        return out + self._emit(kind, {"response": self.object()})

    def _where(self) -> dict[str, Any]:
        return {"item_id": item_id(self.request_id), "output_index": 0, "content_index": 0}

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self._part(text)]
        return {
            "id": item_id(self.request_id),
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def _emit(self, kind: str, body: dict[str, Any]) -> bytes:
        seq, self.seq = self.seq, self.seq + 1
        if seq <= self.after:
            return b""
        data = json.dumps({"type": kind, "sequence_number": seq, **body}, ensure_ascii=False, separators=(",", ":"))
        return frame(kind, data, str(seq))


# --- the create body ---------------------------------------------------------------------------------------------

# Accepted and understood; each is parsed below.
SUPPORTED = frozenset(
    {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "background", "store"}
    | {"metadata"}
)
# Accepted and ignored: they change nothing a client can see here.
IGNORED = frozenset(
    {"user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier", "stream_options"}
    | {"parallel_tool_calls", "max_tool_calls"}
)
# What is refused with a clear error when asked for (a null, empty or default value asks for nothing).
REFUSED = {
    "tools": "tools (function calling, built-in tools) are not supported",
    "tool_choice": "tools are not supported",
    "reasoning": "reasoning options are not supported",
    "previous_response_id": "previous_response_id is not supported: send the whole conversation as input",
    "conversation": "conversations are not supported: send the whole conversation as input",
    "prompt": "prompt templates are not supported",
    "include": "include is not supported",
    "text": "only plain text output is supported",
    "top_logprobs": "logprobs are not supported",
    "truncation": "only truncation 'disabled' is supported",
    "background_options": "background_options are not supported",
}


@dataclass(frozen=True, slots=True)
class CreateSpec:
    """A validated ``POST /v1/responses`` body (its ``model`` is resolved like every endpoint's)."""

    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    stream: bool
    background: bool
    store: bool
    metadata: dict[str, str]


def _asks_nothing(name: str, value: Any) -> bool:
    if value is None or value == [] or value == {} or value is False:
        return True
    if name == "tool_choice":
        return value in ("none", "auto")
    if name == "truncation":
        return value == "disabled"
    if name == "text" and isinstance(value, dict):
        fmt = value.get("format")
        return set(value) <= {"format", "verbosity"} and (fmt is None or fmt == {"type": "text"})
    return False


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(name, "must be a boolean")
    return value


def parse_create(body: dict[str, Any], max_tokens_limit: int) -> CreateSpec:
    """Validate a create body: what is implemented is parsed, what is not is refused with a code (400)."""
    for name, value in body.items():
        if name in SUPPORTED or name in IGNORED:
            continue
        if name in REFUSED:
            if not _asks_nothing(name, value):
                raise Unsupported(name, REFUSED[name])
            continue
        if value is not None:
            raise Unsupported(name, "unknown or unsupported parameter")
    messages = parse_input(body.get("input"), body.get("instructions"))
    sampling_body = {"max_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature")}
    sampling_body["top_p"] = body.get("top_p")
    try:
        sampling = parse_sampling(sampling_body, max_tokens_limit, default_max_tokens=max_tokens_limit)
    except FieldError as exc:
        name = "max_output_tokens" if exc.field == "max_tokens" else exc.field
        raise FieldError(name, str(exc).partition(": ")[2]) from None
    stream = _bool(body, "stream", False)
    background = _bool(body, "background", False)
    store = _bool(body, "store", True)
    if background and not store:
        raise Unsupported("store", "a background response must be stored (store=true)")
    return CreateSpec(
        messages,
        sampling,
        stream,
        background,
        store,
        parse_metadata(body.get("metadata")),
    )


def parse_metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        raise FieldError("metadata", f"must be an object of at most {MAX_METADATA} string values")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise FieldError("metadata", "keys are at most 64 characters, values strings of at most 512")
    return dict(value)


def _text_of(content: Any, where: str, part_type: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(where, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise Unsupported(f"{where}[{j}]", "only text content parts are supported")
        if part.get("type") not in (part_type, "text"):
            raise Unsupported(f"{where}[{j}]", f"only {part_type} parts are supported (no images, files or audio)")
        texts.append(part["text"])
    return "".join(texts)


def parse_input(raw: Any, instructions: Any) -> tuple[ChatMessage, ...]:
    """``input`` (a string, or a list of messages with text content) and ``instructions`` as chat turns."""
    out: list[ChatMessage] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise FieldError("instructions", "must be a string")
        out.append(ChatMessage("system", instructions))
    if isinstance(raw, str):
        out.append(ChatMessage("user", raw))
    elif isinstance(raw, list) and raw:
        if len(raw) > MAX_INPUT_ITEMS:
            raise FieldError("input", f"at most {MAX_INPUT_ITEMS} items")
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise FieldError(f"input[{i}]", "must be an object")
            kind = item.get("type", "message")
            if kind != "message":
                raise Unsupported(f"input[{i}]", f"input items of type {str(kind)[:40]!r} are not supported")
            role = "system" if item.get("role") == "developer" else item.get("role")
            if role not in CHAT_ROLES:
                raise FieldError(f"input[{i}].role", "must be one of user, system, developer, assistant")
            part_type = "output_text" if role == "assistant" else "input_text"
            out.append(ChatMessage(role, _text_of(item.get("content"), f"input[{i}].content", part_type)))
    else:
        raise FieldError("input", "must be a string or a non-empty list of messages")
    for m in out:
        if len(m.content) > 200_000 or any(0xD800 <= ord(c) <= 0xDFFF for c in m.content):
            raise FieldError("input", "a message is over 200000 characters or holds a lone surrogate")
    return tuple(out)


# --- answering -----------------------------------------------------------------------------------------------------


async def create(request: web.Request) -> web.StreamResponse:
    gw = gateway_of(request)
    tenant = require_key(request)
    body = await read_json(request)
    spec = parse_create(body, gw.settings.max_tokens_limit)
    model = resolve_model(gw, parse_model(body))
    check_limits(model, spec.sampling, spec.messages)
    check_backlog(gw, model.name)
    prompt = "\n".join(m.content for m in spec.messages)
    req = new_inference_request(prompt, spec.sampling, tenant, spec.messages, model=model.name)
    options = ResponseOptions(model.name, spec.background, spec.store, spec.metadata)
    accepted = Accepted(model.name, tenant, req.deadline_ms, spec.background, spec.store, spec.metadata)
    surface = ResponseEvents(AnswerFold(model.name), req.request_id, options)
    if spec.background and not spec.stream:
        await produce_request(gw, req, accepted)
        answer = surface.object()
        if gw.auth.enabled:  # for a browser's EventSource, which cannot send an Authorization header
            answer["stream_token"] = gw.auth.sign(req.request_id)
        return web.json_response(answer, headers={"X-Request-Id": req.request_id})
    sub = await gw.hub.subscribe(req.request_id, None)
    assert sub is not None  # no cursor: a subscription always starts
    try:
        await produce_request(gw, req, accepted)
        events = follow(request, sub)
        if spec.stream:
            # A foreground stream's client that leaves cancels the response; a background one keeps running.
            return await _stream(request, gw, surface, events, foreground=not spec.background)
        return await _whole(gw, surface, events)
    finally:
        gw.hub.unsubscribe(sub)


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


async def _whole(gw: Gateway, surface: ResponseEvents, events: AsyncIterator[ViewEvent | None]) -> web.Response:
    try:
        async for ev in events:
            if ev is None:
                break
            _refuse_early(surface, ev)
            surface.feed(ev)
            if surface.ended:
                return web.json_response(surface.object(), headers={"X-Request-Id": surface.request_id})
    finally:
        if not surface.ended:
            await cancel_quietly(gw, surface.request_id)
    raise ClientClosed("client went away")


async def _known_view(request: web.Request, request_id: str) -> View:
    """The request's view once the log shows it (a young id may still be on its way); NotFound otherwise.

    A response's Accepted is its first record in its partition and retention deletes a partition's oldest records
    first: while the Accepted is in the log, every later event is too, so the numbering cannot shift. A request
    without it that is older than the retention window may have lost its beginning: that is refused as expired.
    """
    gw = gateway_of(request)
    if gw.auth.enabled and "token" not in request.query:
        require_key(request)  # before any waiting
    created_ms = request_id_time_ms(request_id)
    while True:
        view = await gw.hub.snapshot(request_id)
        if view.known or time.time() * 1000 >= created_ms + ACCEPT_GRACE_MS:
            break
        await asyncio.sleep(ACCEPT_POLL_S)
    if view.known:
        await authorize_read(request, request_id)
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
    stream = _query_bool(request, "stream")
    after = _starting_after(request) if stream else -1
    view = await _known_view(request, request_id)
    options = ResponseOptions.of_view(view, gw.settings.default_model)
    surface = ResponseEvents(AnswerFold(options.model), request_id, options, after=after)
    sub = await gw.hub.subscribe(request_id, None)
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
        gw.hub.unsubscribe(sub)


async def cancel(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    request_id = request_id_of_response(request.match_info["id"])
    view = await _known_view(request, request_id)
    options = ResponseOptions.of_view(view, gw.settings.default_model)
    if not options.background:
        raise Conflict("only background responses can be cancelled", code="not_background")
    surface = ResponseEvents(AnswerFold(options.model), request_id, options)
    sub = await gw.hub.subscribe(request_id, None)
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
        gw.hub.unsubscribe(sub)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{id}", retrieve)
    app.router.add_post("/v1/responses/{id}/cancel", cancel)

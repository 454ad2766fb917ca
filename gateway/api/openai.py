"""OpenAI-compatible API: one fold of a request's view events into an answer, shaped per API, streamed or whole."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, assert_never

from aiohttp import web

from gateway.api.context import (
    Gateway,
    check_backlog,
    check_limits,
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
from gateway.api.validation import (
    PRIORITY_HEADER,
    parse_messages,
    parse_n,
    parse_priority,
    parse_prompt,
    parse_sampling,
    parse_stream_flags,
    parse_structured,
)
from gateway.fanout.subscription import Subscription
from schemas.errors import ClientClosed, TokenRelayError, ended_with
from schemas.records import ChatMessage, InferenceRequest
from schemas.structured import calls_tools, tool_names
from schemas.toolcalls import ToolCall, ToolCallParser, call_id, openai_calls, split_calls
from schemas.view import EventName, ViewEvent
from services.requests import new_inference_request

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 1.0


# --- the fold: view events -> what every OpenAI answer says (pure) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Text that extends what the answer said so far."""

    text: str


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A restarted run that does not extend the text so far: a whole answer takes it, a stream cannot."""

    text: str


@dataclass(frozen=True, slots=True)
class Completed:
    finish_reason: str  # OpenAI's: "stop" or "length"
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens
    tool_calls: list[dict[str, Any]] | None = None  # the calls the worker found in the answer


@dataclass(frozen=True, slots=True)
class Failed:
    code: str
    message: str


Step = TextDelta | Rewritten | Completed | Failed

TOO_SLOW = Failed("too_slow", "the client did not keep up with the stream")


@dataclass(slots=True)
class AnswerFold:
    """Folds one request's view events, in order, into steps: text deltas, then one Completed or Failed.

    ``model`` and ``text`` are the answer so far (the model as the worker reports it once started).
    """

    model: str
    text: str = ""

    def feed(self, name: EventName, data: dict[str, Any]) -> Step | None:
        match name:
            case EventName.STARTED:
                self.model = data.get("model") or self.model
                continued = data.get("text", "")
                if continued:
                    self.text = continued
                    return TextDelta(continued)
                return None
            case EventName.TOKEN:
                self.text += data["text"]
                return TextDelta(data["text"])
            case EventName.RESTART:
                text = data.get("text", "")
                said, self.text = self.text, text
                return TextDelta(text[len(said) :]) if text.startswith(said) else Rewritten(text)
            case EventName.DONE:
                usage = dict(data["usage"])
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                reason = "length" if data["finish_reason"] == "length" else "stop"
                return Completed(reason, usage, data.get("tool_calls"))
            case EventName.ERROR:
                return Failed(data.get("code", "failed"), data.get("message", ""))
            case EventName.RESET:
                return None  # the relay's frame, never a view event: the fold does not see it
            case _:
                assert_never(name)


# --- surfaces: how one OpenAI API shapes the steps ----------------------------------------------------------------


class Surface(Protocol):
    """One OpenAI API's shapes: the frames of its stream, and its whole (non-streaming) answer."""

    def opening(self) -> bytes:
        """Frames before any step."""
        ...

    def delta(self, text: str) -> bytes: ...

    def completed(self, end: Completed) -> bytes:
        """The last frames of a stream that completed."""
        ...

    def failed(self, code: str, message: str) -> bytes:
        """The last frames of a stream that ends in an error (the status line is long gone)."""
        ...

    def whole(self, end: Completed) -> dict[str, Any]:
        """The whole answer's JSON body."""
        ...


def data_frame(body: Any) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


DONE_FRAME = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Completions:
    """``/v1/completions`` (text_completion) and ``/v1/chat/completions`` (chat.completion[.chunk]); with ``tools``
    (a chat request that may call them: the names), ``<tool_call>`` blocks of the output are ``tool_calls``."""

    fold: AnswerFold
    request_id: str
    chat: bool
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    tools: list[str] | None = None
    parser: ToolCallParser | None = None
    calls: int = 0

    def __post_init__(self) -> None:
        if self.tools is not None:
            self.parser = ToolCallParser(self.tools)

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def _chunk(self, text: str | None, finish: str | None, *, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = self._object("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return data_frame(body)

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.fold.model, "choices": choices}

    def opening(self) -> bytes:
        return self._chunk("", None, role=True) if self.chat else b""

    def delta(self, text: str) -> bytes:
        if self.parser is None:
            return self._chunk(text, None)
        shown, calls = self.parser.feed(text)
        return self._text_and_calls(shown, calls)

    def _text_and_calls(self, shown: str, calls: list[ToolCall]) -> bytes:
        frames = self._chunk(shown, None) if shown else b""
        for call in calls:
            self.calls += 1
            start = {"index": call.index, "id": call_id(self.request_id, call.index), "type": "function"}
            frames += self._delta({"tool_calls": [{**start, "function": {"name": call.name, "arguments": ""}}]})
            frames += self._delta({"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]})
        return frames

    def _delta(self, delta: dict[str, Any]) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        body = self._object("chat.completion.chunk", [choice])
        if self.include_usage:
            body["usage"] = None
        return data_frame(body)

    def _finish_reason(self, end: Completed, called: bool) -> str:
        return "tool_calls" if called and end.finish_reason == "stop" else end.finish_reason

    def completed(self, end: Completed) -> bytes:
        frames = b""
        if self.parser is not None:
            frames += self._text_and_calls(*self.parser.finish())
        frames += self._chunk(None if self.chat else "", self._finish_reason(end, self.calls > 0))
        if self.include_usage:
            kind = "chat.completion.chunk" if self.chat else "text_completion"
            frames += data_frame({**self._object(kind, []), "usage": end.usage})
        return frames + DONE_FRAME

    def failed(self, code: str, message: str) -> bytes:
        return data_frame({"error": {"code": code, "message": message, "type": "server_error"}}) + DONE_FRAME

    def whole(self, end: Completed) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": end.finish_reason}
        names = self.tools
        if names is None and end.tool_calls:  # a Batch API line: the worker's record names the functions called
            names = [c["function"]["name"] for c in end.tool_calls]
        if self.chat and names is not None:
            content, calls = split_calls(self.fold.text, names)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": content if content.strip() or not calls else None,
            }
            if calls:
                message["tool_calls"] = openai_calls(self.request_id, calls)
            choice["message"] = message
            choice["finish_reason"] = self._finish_reason(end, bool(calls))
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": self.fold.text}
        else:
            choice["text"] = self.fold.text
        body = self._object("chat.completion" if self.chat else "text_completion", [choice])
        body["usage"] = end.usage
        return body


# --- answering: submit, follow the relay, answer streamed or whole ---------------------------------------------------


async def answer(
    request: web.Request, req: InferenceRequest, fold: AnswerFold, surface: Surface, *, stream: bool
) -> web.StreamResponse:
    """Submit ``req`` and answer with its fold, streamed or whole; a client that leaves early cancels the request."""
    gw = gateway_of(request)
    sub = await gw.relay.subscribe(req.request_id, None)
    assert sub is not None  # no cursor: a subscription always starts
    try:
        await produce_request(gw, req)
        events = follow(request, sub)
        if stream:
            return await _stream(request, gw, req.request_id, fold, surface, events)
        return await _whole(gw, req.request_id, fold, surface, events)
    finally:
        gw.relay.unsubscribe(sub)


async def follow(request: web.Request, sub: Subscription) -> AsyncIterator[ViewEvent | None]:
    """The subscription's view events to the terminal one; a last None when the hub dropped it as too slow.

    Ends early, without a terminal event, when the client went away.
    """
    for out in sub.backlog:
        yield out.event
        if out.event.terminal:
            return
    while True:
        live = await sub.next(DISCONNECT_POLL_S)
        if live is None:
            if sub.error is not None:  # the stream could not be followed: an error, not a slow client
                yield ViewEvent(-1, EventName.ERROR, dict(sub.error), "", -1, int(time.time() * 1000))
                return
            if sub.closed is not None:
                yield None
                return
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            continue
        yield live.event
        if live.event.terminal:
            return


async def _stream(
    request: web.Request,
    gw: Gateway,
    request_id: str,
    fold: AnswerFold,
    surface: Surface,
    events: AsyncIterator[ViewEvent | None],
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Request-Id": request_id,
            **cors_headers(request),
        }
    )
    gw.metrics.active_streams.inc()
    ended = False
    try:
        # Headers wait for the first event: a request the worker refuses (its prompt is too long for the model, say)
        # is then an HTTP error with its status, as OpenAI clients expect, rather than an error inside a 200 stream.
        first = await anext(events, None)
        if first is not None and first.event == EventName.ERROR:
            ended = True
            raise ended_with(first.data.get("code", "failed"), first.data.get("message", ""))
        await response.prepare(request)
        if opening := surface.opening():
            await response.write(opening)
        async for ev in _chain(first, events):
            step = fold.feed(ev.event, ev.data) if ev is not None else TOO_SLOW
            if step is None:
                continue
            if isinstance(step, TextDelta):
                await response.write(surface.delta(step.text))
                continue
            ended = True
            await response.write(_last_frames(surface, step))
            break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        gw.metrics.active_streams.dec()
        if not ended:
            await cancel_quietly(gw, request_id)
    return response


def _last_frames(surface: Surface, step: Completed | Failed | Rewritten) -> bytes:
    match step:
        case Completed():
            return surface.completed(step)
        case Failed():
            return surface.failed(step.code, step.message)
        case Rewritten():  # a stream cannot take back what it sent
            return surface.failed("restarted", "generation restarted and cannot be continued")
        case _:
            assert_never(step)


async def _whole(
    gw: Gateway, request_id: str, fold: AnswerFold, surface: Surface, events: AsyncIterator[ViewEvent | None]
) -> web.Response:
    ended = False
    try:
        async for ev in events:
            if ev is None:
                break  # dropped as too slow: like a client that went away
            try:
                body = whole_step(fold, surface, ev)
            except TokenRelayError:
                ended = True
                raise
            if body is not None:
                ended = True
                return web.json_response(body, headers={"X-Request-Id": request_id})
    finally:
        if not ended:
            await cancel_quietly(gw, request_id)
    raise ClientClosed("client went away")


def whole_step(fold: AnswerFold, surface: Surface, ev: ViewEvent) -> dict[str, Any] | None:
    """One view event into a whole (non-streaming) answer: its body once complete, None before; the request's error
    (``ended_with``) when it failed. The endpoints' answer and a Batch API line's body."""
    step = fold.feed(ev.event, ev.data)
    if isinstance(step, Completed):
        return surface.whole(step)
    if isinstance(step, Failed):
        raise ended_with(step.code, step.message)
    return None


async def _chain(first: ViewEvent | None, rest: AsyncIterator[ViewEvent | None]) -> AsyncIterator[ViewEvent | None]:
    if first is not None:
        yield first
    async for ev in rest:
        yield ev


async def cancel_quietly(gw: Gateway, request_id: str) -> None:
    # The client is gone: nobody can be told that the cancel failed; the request then runs to its end.
    with contextlib.suppress(Exception):
        await asyncio.shield(produce_cancel(gw, request_id, "client_disconnected"))


# --- handlers ------------------------------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completions(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completions(request, chat=True)


async def _completions(request: web.Request, *, chat: bool) -> web.StreamResponse:
    gw = gateway_of(request)
    tenant = require_key(request)
    body = await read_json(request)
    stream, include_usage = parse_stream_flags(body)
    await refresh_routes(gw, parse_model(body))
    priority = parse_priority(body, request.headers.get(PRIORITY_HEADER))
    req = completion_request(gw, body, tenant, chat=chat, priority=priority)
    check_backlog(gw, req.model)
    fold = AnswerFold(req.model)
    surface = Completions(fold, req.request_id, chat, include_usage, tools=tools_called(req))
    return await answer(request, req, fold, surface, stream=stream)


def tools_called(req: InferenceRequest) -> list[str] | None:
    """The names of the functions a request's model may call (its output is then parsed for calls), else None."""
    return tool_names(req.tools) if calls_tools(req.tools, req.tool_choice) else None


def completion_request(
    gw: Gateway, body: dict[str, Any], tenant: str, *, chat: bool, priority: str = "interactive"
) -> InferenceRequest:
    """The record a ``/v1/completions`` (or, ``chat``, ``/v1/chat/completions``) body becomes, checked against the
    model's limits: the endpoint's, and each line's of a Batch API file."""
    parse_n(body)
    messages: tuple[ChatMessage, ...] | None = None
    if chat:
        messages = parse_messages(body)
        prompt = ""  # the text travels once, in `messages`
    else:
        prompt = parse_prompt(body)
    sampling = parse_sampling(body, gw.settings.max_tokens_limit, default_max_tokens=256 if chat else 16)
    if chat:
        sampling = parse_structured(body).apply(sampling)
    model = resolve_model(gw, parse_model(body))
    check_limits(model, sampling, messages)
    return new_inference_request(prompt, sampling, tenant, messages, model=model.name, priority=priority)


async def models(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    require_key(request)
    live = gw.models.live(int(time.time() * 1000))
    return web.json_response({"object": "list", "data": [model.as_openai() for model in live.values()]})

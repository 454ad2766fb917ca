"""OpenAI-compatible API: one fold of a request's view events into an answer, shaped per API, streamed or whole."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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
from gateway.api.delivery import first_byte
from gateway.api.logprobs import Entry, chat_content, completions_logprobs, text_length
from gateway.api.validation import (
    CHAT_SAMPLING_NAMES,
    PRIORITY_HEADER,
    parse_completions_logprobs,
    parse_messages,
    parse_priority,
    parse_prompt,
    parse_sampling,
    parse_stream_flags,
    parse_structured,
)
from gateway.fanout.sse import KEEPALIVE
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
    """Text that extends what choice ``index`` of the answer said so far, with its tokens' logprobs when asked."""

    text: str
    index: int = 0
    logprobs: tuple[Entry, ...] = ()


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A restarted run that does not extend the text so far: a whole answer takes it, a stream cannot."""

    text: str


@dataclass(frozen=True, slots=True)
class Completed:
    finish_reason: str  # OpenAI's: "stop" or "length"
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens
    choice_finish_reasons: tuple[str, ...] = ()  # each choice's (n > 1)
    tool_calls: list[dict[str, Any]] | None = None  # the calls the worker found in choice 0's answer

    def reason_of(self, index: int) -> str:
        reasons = self.choice_finish_reasons
        return reasons[index] if index < len(reasons) else self.finish_reason


def _openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True, slots=True)
class Failed:
    code: str
    message: str


Step = TextDelta | Rewritten | Completed | Failed

TOO_SLOW = Failed("too_slow", "the client did not keep up with the stream")


@dataclass(slots=True)
class AnswerFold:
    """Folds one request's view events, in order, into steps: text deltas, then one Completed or Failed.

    ``model`` and ``text`` are the answer so far (the model as the worker reports it once started); ``text`` is
    choice 0's, ``choices`` the others' (n > 1), ``logprobs`` each choice's token logprobs when the request asked.
    """

    model: str
    text: str = ""
    choices: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[Entry]] = field(default_factory=dict)

    def text_of(self, index: int) -> str:
        return self.text if index == 0 else self.choices.get(index, "")

    def logprobs_of(self, index: int) -> list[Entry]:
        return self.logprobs.get(index, [])

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
                index, text, entries = data.get("index", 0), data["text"], data.get("logprobs", [])
                if index:
                    self.choices[index] = self.choices.get(index, "") + text
                else:
                    self.text += text
                if entries:
                    self.logprobs.setdefault(index, []).extend(entries)
                return TextDelta(text, index, tuple(entries))
            case EventName.RESTART:
                text = data.get("text", "")
                said, self.text = self.text, text
                if text.startswith(said) and not self.choices:
                    return TextDelta(text[len(said) :])
                self.choices.clear()  # a run of several choices starts them all over
                self.logprobs.clear()
                return Rewritten(text)
            case EventName.DONE:
                usage = dict(data["usage"])
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                reasons = tuple(_openai_reason(r) for r in data.get("choice_finish_reasons", ()))
                return Completed(_openai_reason(data["finish_reason"]), usage, reasons, data.get("tool_calls"))
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

    def delta(self, step: TextDelta) -> bytes: ...

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
    """``/v1/completions`` (text_completion) and ``/v1/chat/completions`` (chat.completion[.chunk]).

    ``n`` choices, each streamed with its ``index``; ``logprobs``: the request asked for them (else null). With
    ``tools`` (a chat request that may call them: their names), each choice's ``<tool_call>`` blocks are its
    ``tool_calls`` (its content chunks then carry no logprobs).
    """

    fold: AnswerFold
    request_id: str
    chat: bool
    include_usage: bool = False
    n: int = 1
    logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    offsets: dict[int, int] = field(default_factory=dict)  # completions: where each choice's next token starts
    tools: list[str] | None = None
    parsers: dict[int, ToolCallParser] = field(default_factory=dict)  # each choice's, with tools

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def _logprobs(self, index: int, entries: Sequence[Entry]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": chat_content(entries), "refusal": None}
        offset = self.offsets.get(index, 0)
        self.offsets[index] = offset + text_length(entries)
        return completions_logprobs(entries, offset)

    def _chunk(
        self, text: str | None, finish: str | None, *, index: int = 0, role: bool = False, entries: Sequence[Entry] = ()
    ) -> bytes:
        logprobs = self._logprobs(index, entries) if entries else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        body = self._object("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return data_frame(body)

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.fold.model, "choices": choices}

    def opening(self) -> bytes:
        return b"".join(self._chunk("", None, index=i, role=True) for i in range(self.n)) if self.chat else b""

    def delta(self, step: TextDelta) -> bytes:
        if self.tools is None or not self.chat:
            return self._chunk(step.text, None, index=step.index, entries=step.logprobs)
        return self._text_and_calls(step.index, *self._parser(step.index).feed(step.text))

    def _parser(self, index: int) -> ToolCallParser:
        return self.parsers.setdefault(index, ToolCallParser(self.tools or ()))

    def _text_and_calls(self, index: int, shown: str, calls: list[ToolCall]) -> bytes:
        frames = self._chunk(shown, None, index=index) if shown else b""
        for call in calls:
            start = {"index": call.index, "id": self._call_id(index, call), "type": "function"}
            frames += self._delta(index, {"tool_calls": [{**start, "function": {"name": call.name, "arguments": ""}}]})
            arguments = {"index": call.index, "function": {"arguments": call.arguments}}
            frames += self._delta(index, {"tool_calls": [arguments]})
        return frames

    def _call_id(self, index: int, call: ToolCall) -> str:
        return call_id(self.request_id if index == 0 else f"{self.request_id}-{index}", call.index)

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        body = self._object("chat.completion.chunk", [choice])
        if self.include_usage:
            body["usage"] = None
        return data_frame(body)

    def _reason(self, end: Completed, index: int, called: bool) -> str:
        reason = end.reason_of(index)
        return "tool_calls" if called and reason == "stop" else reason

    def completed(self, end: Completed) -> bytes:
        frames = b""
        for i in range(self.n):
            parser = self.parsers.get(i)
            if parser is not None:
                frames += self._text_and_calls(i, *parser.finish())
            called = parser is not None and bool(parser.calls)
            frames += self._chunk(None if self.chat else "", self._reason(end, i, called), index=i)
        if self.include_usage:
            kind = "chat.completion.chunk" if self.chat else "text_completion"
            frames += data_frame({**self._object(kind, []), "usage": end.usage})
        return frames + DONE_FRAME

    def failed(self, code: str, message: str) -> bytes:
        return data_frame({"error": {"code": code, "message": message, "type": "server_error"}}) + DONE_FRAME

    def whole(self, end: Completed) -> dict[str, Any]:
        choices = []
        for i in range(self.n):
            choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": end.reason_of(i)}
            if self.logprobs:
                self.offsets.pop(i, None)
                choice["logprobs"] = self._logprobs(i, self.fold.logprobs_of(i))
            names = self.tools
            if names is None and i == 0 and end.tool_calls:  # a Batch API line: the record names the functions
                names = [c["function"]["name"] for c in end.tool_calls]
            if self.chat and names is not None:
                content, calls = split_calls(self.fold.text_of(i), names)
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": content if content.strip() or not calls else None,
                }
                if calls:
                    message["tool_calls"] = [
                        {**entry, "id": self._call_id(i, call)}
                        for entry, call in zip(openai_calls(self.request_id, calls), calls, strict=True)
                    ]
                choice["message"] = message
                choice["finish_reason"] = self._reason(end, i, bool(calls))
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": self.fold.text_of(i)}
            else:
                choice["text"] = self.fold.text_of(i)
            choices.append(choice)
        body = self._object("chat.completion" if self.chat else "text_completion", choices)
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
        if stream:
            return await _stream(request, gw, req.request_id, fold, surface, sub)
        return await _whole(gw, req.request_id, fold, surface, follow(request, sub))
    finally:
        gw.relay.unsubscribe(sub)


async def follow(
    request: web.Request,
    sub: Subscription,
    idle: Callable[[], Awaitable[None]] | None = None,
    idle_s: float = 15.0,
) -> AsyncIterator[ViewEvent | None]:
    """The subscription's view events to the terminal one; a last None when the hub dropped it as too slow.

    Ends early, without a terminal event, when the client went away. ``idle`` is awaited after each ``idle_s``
    without an event (a stream's keep-alive).
    """
    quiet_since = time.monotonic()
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
            if idle is not None and time.monotonic() - quiet_since >= idle_s:
                quiet_since = time.monotonic()
                await idle()
            continue
        quiet_since = time.monotonic()
        yield live.event
        if live.event.terminal:
            return


def follow_streamed(
    request: web.Request, sub: Subscription, response: web.StreamResponse, idle_s: float
) -> AsyncIterator[ViewEvent | None]:
    """``follow`` for a stream: a `: keepalive` comment every ``idle_s`` while idle, once its headers are out."""

    async def keepalive() -> None:
        if response.prepared:
            await response.write(KEEPALIVE)

    return follow(request, sub, keepalive, idle_s)


async def _stream(
    request: web.Request,
    gw: Gateway,
    request_id: str,
    fold: AnswerFold,
    surface: Surface,
    sub: Subscription,
) -> web.StreamResponse:
    """The surface's frames as the events come; a `: keepalive` comment every ``TOKENRELAY_KEEPALIVE_S`` while idle
    once the headers are out (they wait for the first event, see below)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Request-Id": request_id,
            **cors_headers(request),
        }
    )
    events = follow_streamed(request, sub, response, gw.settings.keepalive_s)
    gw.metrics.active_streams.inc()
    delivery = first_byte(request, gw, request_id, resumed=False, api="openai")
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
                await response.write(surface.delta(step))
                if delivery is not None:
                    delivery.wrote(ev)
                continue
            ended = True
            await response.write(_last_frames(surface, step))
            if delivery is not None:
                delivery.wrote(ev)
            break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        gw.metrics.active_streams.dec()
        if delivery is not None:
            delivery.close()
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
    surface = Completions(fold, req.request_id, chat, include_usage, req.n, req.logprobs, tools=tools_called(req))
    return await answer(request, req, fold, surface, stream=stream)


def tools_called(req: InferenceRequest) -> list[str] | None:
    """The names of the functions a request's model may call (its output is then parsed for calls), else None."""
    return tool_names(req.tools) if calls_tools(req.tools, req.tool_choice) else None


def completion_request(
    gw: Gateway, body: dict[str, Any], tenant: str, *, chat: bool, priority: str = "interactive"
) -> InferenceRequest:
    """The record a ``/v1/completions`` (or, ``chat``, ``/v1/chat/completions``) body becomes, checked against the
    model's limits: the endpoint's, and each line's of a Batch API file."""
    messages: tuple[ChatMessage, ...] | None = None
    if chat:
        messages = parse_messages(body)
        prompt = ""  # the text travels once, in `messages`
    else:
        prompt = parse_prompt(body)
        body = parse_completions_logprobs(body)
    sampling = parse_sampling(
        body, gw.settings.max_tokens_limit, default_max_tokens=256 if chat else 16, names=CHAT_SAMPLING_NAMES
    )
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

"""The Responses API's shapes, pure: the answer fold's steps as numbered events and the response object."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from gateway.api.logprobs import chat_content
from gateway.api.openai import AnswerFold, Completed, Failed, Rewritten, TextDelta
from gateway.fanout.sse import frame
from schemas.ids import request_id_time_ms
from schemas.records import Accepted
from schemas.toolcalls import ToolCall, ToolCallParser, call_id
from schemas.view import EventName, View, ViewEvent

RESPONSE_PREFIX = "resp_"
ITEM_PREFIX = "msg_"
CALL_ITEM_PREFIX = "fc_"

# --- ids: a response id is the request id, spelled the OpenAI way (no gateway state maps one to the other) ---------


def response_id(request_id: str) -> str:
    return RESPONSE_PREFIX + uuid.UUID(request_id).hex


def item_id(request_id: str) -> str:
    return ITEM_PREFIX + uuid.UUID(request_id).hex


def call_item_id(request_id: str, index: int) -> str:
    return f"{CALL_ITEM_PREFIX}{uuid.UUID(request_id).hex}_{index}"


# --- what a response echoes, from the create body or from the log's Accepted record ----------------------------


@dataclass(frozen=True, slots=True)
class ResponseOptions:
    """The options a response object shows; recorded in the request's Accepted event so every gateway knows them."""

    model: str
    background: bool = False
    store: bool = True
    metadata: Mapping[str, str] = field(default_factory=dict)
    echo: Mapping[str, Any] = field(default_factory=dict)  # the create options the object shows (Accepted.response)

    @property
    def tools(self) -> tuple[str, ...] | None:
        """The functions the model may call (its output is then parsed for calls), from the echoed create options:
        every gateway that reads the Accepted record parses the same way."""
        names = tuple(t.get("name", "") for t in self.echo.get("tools", []) if isinstance(t, dict))
        return names if names and self.echo.get("tool_choice") != "none" else None

    @classmethod
    def of_accepted(cls, accepted: Accepted | None, model: str) -> ResponseOptions:
        if accepted is None:  # submitted another way (native API, straight onto Kafka): the defaults
            return cls(model)
        echo = json.loads(accepted.response) if accepted.response else {}
        return cls(accepted.model or model, accepted.background, accepted.store, dict(accepted.metadata), echo)

    @classmethod
    def of_view(cls, view: View, default_model: str) -> ResponseOptions:
        accepted = view.log.accepted
        return cls.of_accepted(accepted, (accepted.model if accepted else "") or view.model or default_model)


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
    progressed: bool = False
    # With tools: the output items in order (None: the message, begun at its first visible text), and the parser.
    items: list[ToolCall | None] = field(default_factory=list)
    parser: ToolCallParser | None = None
    shown: str = ""

    def __post_init__(self) -> None:
        self.status = self.status or ("queued" if self.options.background else "in_progress")
        tools = self.options.tools
        if tools is not None:
            self.parser = ToolCallParser(tools)

    # Surface
    def opening(self) -> bytes:
        return self._emit("response.created", {"response": self.object()})

    def delta(self, step: TextDelta) -> bytes:
        if self.parser is not None:
            return self._shown_and_calls(*self.parser.feed(step.text))
        out = b"" if self.begun else self._begin()
        logprobs = chat_content(step.logprobs)
        return out + self._emit(
            "response.output_text.delta", {**self._where(), "delta": step.text, "logprobs": logprobs}
        )

    def _shown_and_calls(self, shown: str, calls: list[ToolCall]) -> bytes:
        """With tools: the message's text (no logprobs), and a function_call item with its events per call."""
        out = b""
        if shown and (self.begun or shown.strip()):
            out += b"" if self.begun else self._begin()
            self.shown += shown
            out += self._emit("response.output_text.delta", {**self._where(), "delta": shown, "logprobs": []})
        for call in calls:
            out += self._progress()
            index = len(self.items)
            self.items.append(call)
            where = {"item_id": call_item_id(self.request_id, call.index), "output_index": index}
            out += self._emit("response.output_item.added", {"output_index": index, "item": self._call(call, "")})
            out += self._emit("response.function_call_arguments.delta", {**where, "delta": call.arguments})
            out += self._emit("response.function_call_arguments.done", {**where, "arguments": call.arguments})
            item = self._call(call, call.arguments)
            out += self._emit("response.output_item.done", {"output_index": index, "item": item})
        return out

    def _call(self, call: ToolCall, arguments: str) -> dict[str, Any]:
        return {
            "id": call_item_id(self.request_id, call.index),
            "type": "function_call",
            "status": "completed" if arguments else "in_progress",
            "arguments": arguments,
            "call_id": call_id(self.request_id, call.index),
            "name": call.name,
        }

    @property
    def text(self) -> str:
        """The message's text: what the model wrote, less its tool calls."""
        return self.fold.text if self.parser is None else self.shown

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
            out += self._begin() if self.parser is None else self._progress()
        step = self.fold.feed(ev.event, ev.data)
        match step:
            case None:
                pass
            case TextDelta():
                out += self.delta(step) if step.text or step.logprobs else b""
            case Completed():
                out += self._finish(step, cancelled=ev.data.get("finish_reason") == "cancelled")
            case Failed():
                out += self.failed(step.code, step.message)
            case Rewritten():  # a stream cannot take back what it sent; the object agrees with it
                out += self.failed("restarted", "generation restarted and cannot be continued")
            case _:
                assert_never(step)
        return out

    def connection_error(self, code: str, message: str) -> bytes:
        """An ``error`` event that ends this connection, not the response: the log does not number it.

        It takes the next number without consuming it, so a resume (with that number or the one before) loses nothing.
        """
        body = {"type": "error", "sequence_number": self.seq, "code": code, "message": message, "param": None}
        return frame("error", json.dumps(body, ensure_ascii=False, separators=(",", ":")))

    def object(self) -> dict[str, Any]:
        """The response object as of the events folded so far."""
        echo = self.options.echo
        return {
            "id": response_id(self.request_id),
            "object": "response",
            "created_at": request_id_time_ms(self.request_id) // 1000,
            "status": self.status,
            "background": self.options.background,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "metadata": dict(self.options.metadata),
            "model": self.fold.model,
            "output": self._output(),
            "parallel_tool_calls": echo.get("parallel_tool_calls", False),
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": None,
            "store": self.options.store,
            "temperature": echo.get("temperature"),
            "text": echo.get("text", {"format": {"type": "text"}}),
            "tool_choice": echo.get("tool_choice", "none"),
            "tools": echo.get("tools", []),
            "top_logprobs": echo.get("top_logprobs"),
            "top_p": echo.get("top_p"),
            "truncation": "disabled",
            "usage": self.usage,
            "user": None,
        }

    def _output(self) -> list[dict[str, Any]]:
        if self.parser is None:
            return [self._item(self.item_status, self.fold.text)] if self.begun else []
        return [
            self._item(self.item_status, self.text) if c is None else self._call(c, c.arguments) for c in self.items
        ]

    def _progress(self) -> bytes:
        if self.progressed:
            return b""
        self.progressed = True
        self.status = "in_progress"
        return self._emit("response.in_progress", {"response": self.object()})

    def _begin(self) -> bytes:
        out = self._progress()
        self.begun = True
        self.items.append(None)
        added = {"output_index": self._index(), "item": self._item("in_progress", None)}
        out += self._emit("response.output_item.added", added)
        return out + self._emit("response.content_part.added", {**self._where(), "part": self._part("")})

    def _index(self) -> int:
        return self.items.index(None) if self.parser is not None else 0

    def _finish(self, end: Completed, *, cancelled: bool) -> bytes:
        out = b"" if self.parser is None else self._shown_and_calls(*self.parser.finish())
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
        if self.begun:
            text = self.text
            logprobs = chat_content(self.fold.logprobs_of(0)) if self.parser is None else []
            out += self._emit("response.output_text.done", {**self._where(), "text": text, "logprobs": logprobs})
            out += self._emit("response.content_part.done", {**self._where(), "part": self._part(text)})
            item = self._item(self.item_status, text)
            out += self._emit("response.output_item.done", {"output_index": self._index(), "item": item})
        return out + self._emit(kind, {"response": self.object()})

    def _where(self) -> dict[str, Any]:
        return {"item_id": item_id(self.request_id), "output_index": self._index(), "content_index": 0}

    def _part(self, text: str) -> dict[str, Any]:
        logprobs = chat_content(self.fold.logprobs_of(0)) if text and self.parser is None else []
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}

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

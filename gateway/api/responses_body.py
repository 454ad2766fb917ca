"""The Responses API's create body, pure: what is implemented is parsed, what is not is refused with a code."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.api.validation import MAX_PROMPT_CHARS, parse_sampling
from schemas.errors import FieldError, InvalidParameter, Unsupported
from schemas.records import ChatMessage
from schemas.sampling import SamplingParams
from schemas.structured import Structured, parse_text_format, parse_tool_choice, parse_tools

INPUT_ROLES = ("system", "user", "assistant")

MAX_METADATA = 16
MAX_INPUT_ITEMS = 256

# Accepted and understood; each is parsed below.
SUPPORTED = frozenset(
    {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "background", "store"}
    | {"metadata", "service_tier"}  # service_tier: parsed with the request's class (validation.parse_priority)
    | {"top_logprobs", "include", "previous_response_id"}
    | {"text", "tools", "tool_choice"}
)
# The sampling parameters this API takes, by their names in its body.
SAMPLING_NAMES = {
    "max_tokens": "max_output_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_logprobs": "top_logprobs",
    "logprobs": "logprobs",  # not a body field: set from `include` (or top_logprobs) by parse_create
}
# What `include` may ask for here; OpenAI's other values name tools and inputs this service does not have.
INCLUDES = ("message.output_text.logprobs",)
# Accepted and ignored: they change nothing a client can see here.
IGNORED = frozenset(
    {"user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "stream_options"}
    | {"parallel_tool_calls", "max_tool_calls"}
)
# What is refused with a clear error when asked for (a null, empty or default value asks for nothing).
REFUSED = {
    "reasoning": "reasoning options are not supported",
    "conversation": "conversations are not supported: send the conversation as input, or previous_response_id",
    "prompt": "prompt templates are not supported",
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
    items: tuple[dict[str, Any], ...] = ()  # the input as Responses message items (no ids yet)
    instructions: str | None = None
    previous_response_id: str | None = None
    echo: dict[str, Any] = field(default_factory=dict)  # what the response object shows of the body

    def conversation(self, earlier: Sequence[dict[str, Any]]) -> tuple[ChatMessage, ...]:
        """The chat turns the model gets after ``earlier`` items (a previous response's input and output):
        this body's instructions (an earlier response's are not carried over, as OpenAI does), then every item."""
        head = (ChatMessage("system", self.instructions),) if self.instructions is not None else ()
        return head + tuple(message_of(item) for item in (*earlier, *self.items))


def _asks_nothing(name: str, value: Any) -> bool:
    if value is None or value == [] or value == {} or value is False:
        return True
    if name == "truncation":
        return value == "disabled"
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
    include = body.get("include") or []
    if not isinstance(include, list) or any(value not in INCLUDES for value in include):
        raise Unsupported("include", f"only {', '.join(INCLUDES)} is supported")
    asked = {**body, "logprobs": "message.output_text.logprobs" in include or bool(body.get("top_logprobs"))}
    sampling = parse_sampling(asked, max_tokens_limit, default_max_tokens=max_tokens_limit, names=SAMPLING_NAMES)
    structured = parse_structured(body)
    sampling = structured.apply(sampling)
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise FieldError("previous_response_id", "must be a string")
    stream = _bool(body, "stream", False)
    background = _bool(body, "background", False)
    store = _bool(body, "store", True)
    if background and not store:
        raise Unsupported("store", "a background response must be stored (store=true)")
    instructions = messages[0].content if body.get("instructions") is not None else None
    items = tuple(item for m in (messages[1:] if instructions is not None else messages) for item in _items(m))
    echo = {
        "instructions": instructions,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_output_tokens": body.get("max_output_tokens"),
        "top_logprobs": sampling.top_logprobs,
        "previous_response_id": previous,
        "text": body.get("text") or {"format": {"type": "text"}},
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice") or ("auto" if structured.tools else "none"),
        "parallel_tool_calls": bool(structured.tools),
    }
    return CreateSpec(
        messages,
        sampling,
        stream,
        background,
        store,
        parse_metadata(body.get("metadata")),
        items,
        instructions,
        previous,
        echo,
    )


def parse_structured(body: dict[str, Any]) -> Structured:
    """``text.format``, ``tools`` and ``tool_choice`` (the Responses API's flat shapes) as the record's fields."""
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise InvalidParameter("text", "must be an object")
    tools = parse_tools(body.get("tools"), flat=True)
    choice = parse_tool_choice(body.get("tool_choice"), tools, flat=True)
    return Structured(parse_text_format((text or {}).get("format")), tools, choice)


def _items(message: ChatMessage) -> list[dict[str, Any]]:
    """A chat turn as Responses input items: a message, an assistant's calls as function_call items, a tool's
    answer as a function_call_output."""
    if message.role == "tool":
        return [{"type": "function_call_output", "call_id": message.tool_call_id, "output": message.content}]
    out: list[dict[str, Any]] = []
    if message.content or not message.tool_calls:
        kind = "output_text" if message.role == "assistant" else "input_text"
        content: list[dict[str, Any]] = [{"type": kind, "text": message.content}]
        if kind == "output_text":
            content[0]["annotations"] = []
        out.append({"type": "message", "role": message.role, "content": content, "status": "completed"})
    for call in json.loads(message.tool_calls or "[]"):
        function = call["function"]
        out.append(
            {
                "type": "function_call",
                "call_id": call["id"],
                "name": function["name"],
                "arguments": function["arguments"],
                "status": "completed",
            }
        )
    return out


def message_of(item: dict[str, Any]) -> ChatMessage:
    """The chat turn of a stored item (a message's text parts joined; developer turns are system turns)."""
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        return ChatMessage("assistant", "", json.dumps([call]))
    if kind == "function_call_output":
        return ChatMessage("tool", str(item.get("output", "")), None, item.get("call_id"))
    role = "system" if item.get("role") == "developer" else str(item.get("role"))
    return ChatMessage(role, "".join(part.get("text", "") for part in item.get("content", [])))


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
    """``input`` (a string, or a list of messages with text content, function calls and their outputs) and
    ``instructions`` as chat turns: consecutive function calls are one assistant turn, an output a tool turn."""
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
        names: dict[str, str] = {}  # call id -> function name, for the tool turns that answer them
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise FieldError(f"input[{i}]", "must be an object")
            kind = item.get("type", "message")
            if kind == "function_call":
                out.append(_function_call(item, i, out, names))
                continue
            if kind == "function_call_output":
                call = item.get("call_id")
                output = item.get("output")
                if not isinstance(call, str) or not isinstance(output, str):
                    raise InvalidParameter(f"input[{i}]", "a function_call_output needs call_id and output (strings)")
                out.append(ChatMessage("tool", output, None, call, names.get(call)))
                continue
            if kind != "message":
                raise Unsupported(f"input[{i}]", f"input items of type {str(kind)[:40]!r} are not supported")
            role = "system" if item.get("role") == "developer" else item.get("role")
            if role not in INPUT_ROLES:
                raise FieldError(f"input[{i}].role", "must be one of user, system, developer, assistant")
            part_type = "output_text" if role == "assistant" else "input_text"
            out.append(ChatMessage(role, _text_of(item.get("content"), f"input[{i}].content", part_type)))
    else:
        raise FieldError("input", "must be a string or a non-empty list of messages")
    for m in out:
        if len(m.content) > MAX_PROMPT_CHARS or any(0xD800 <= ord(c) <= 0xDFFF for c in m.content):
            raise FieldError("input", f"a message is over {MAX_PROMPT_CHARS} characters or holds a lone surrogate")
    return tuple(out)


def _function_call(item: dict[str, Any], i: int, out: list[ChatMessage], names: dict[str, str]) -> ChatMessage:
    """A function_call input item as an assistant turn's call; it joins the assistant turn of the call before it."""
    call, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
    if not (isinstance(call, str) and isinstance(name, str) and isinstance(arguments, str)):
        raise InvalidParameter(f"input[{i}]", "a function_call needs call_id, name and arguments (strings)")
    names[call] = name
    entry = {"id": call, "type": "function", "function": {"name": name, "arguments": arguments}}
    if out and out[-1].role == "assistant" and out[-1].tool_calls is not None:
        previous = out.pop()
        return dataclasses.replace(previous, tool_calls=json.dumps([*json.loads(previous.tool_calls or "[]"), entry]))
    return ChatMessage("assistant", "", json.dumps([entry]))

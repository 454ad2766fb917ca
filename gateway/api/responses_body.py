"""The Responses API's create body, pure: what is implemented is parsed, what is not is refused with a code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.api.validation import CHAT_ROLES, MAX_PROMPT_CHARS, parse_sampling
from schemas.errors import FieldError, Unsupported
from schemas.records import ChatMessage
from schemas.sampling import SamplingParams

MAX_METADATA = 16
MAX_INPUT_ITEMS = 256

# Accepted and understood; each is parsed below.
SUPPORTED = frozenset(
    {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "background", "store"}
    | {"metadata", "service_tier"}  # service_tier: parsed with the request's class (validation.parse_priority)
    | {"top_logprobs", "include", "previous_response_id"}
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
    "tools": "tools (function calling, built-in tools) are not supported",
    "tool_choice": "tools are not supported",
    "reasoning": "reasoning options are not supported",
    "conversation": "conversations are not supported: send the conversation as input, or previous_response_id",
    "prompt": "prompt templates are not supported",
    "text": "only plain text output is supported",
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
    include = body.get("include") or []
    if not isinstance(include, list) or any(value not in INCLUDES for value in include):
        raise Unsupported("include", f"only {', '.join(INCLUDES)} is supported")
    asked = {**body, "logprobs": "message.output_text.logprobs" in include or bool(body.get("top_logprobs"))}
    sampling = parse_sampling(asked, max_tokens_limit, default_max_tokens=max_tokens_limit, names=SAMPLING_NAMES)
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise FieldError("previous_response_id", "must be a string")
    stream = _bool(body, "stream", False)
    background = _bool(body, "background", False)
    store = _bool(body, "store", True)
    if background and not store:
        raise Unsupported("store", "a background response must be stored (store=true)")
    instructions = messages[0].content if body.get("instructions") is not None else None
    items = tuple(_item(m) for m in (messages[1:] if instructions is not None else messages))
    echo = {
        "instructions": instructions,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_output_tokens": body.get("max_output_tokens"),
        "top_logprobs": sampling.top_logprobs,
        "previous_response_id": previous,
        "text": body.get("text") or {"format": {"type": "text"}},
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


def _item(message: ChatMessage) -> dict[str, Any]:
    kind = "output_text" if message.role == "assistant" else "input_text"
    content: list[dict[str, Any]] = [{"type": kind, "text": message.content}]
    if kind == "output_text":
        content[0]["annotations"] = []
    return {"type": "message", "role": message.role, "content": content, "status": "completed"}


def message_of(item: dict[str, Any]) -> ChatMessage:
    """The chat turn of a stored message item (its text parts joined; developer turns are system turns)."""
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
        if len(m.content) > MAX_PROMPT_CHARS or any(0xD800 <= ord(c) <= 0xDFFF for c in m.content):
            raise FieldError("input", f"a message is over {MAX_PROMPT_CHARS} characters or holds a lone surrogate")
    return tuple(out)

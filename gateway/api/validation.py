"""Validation of HTTP bodies at the edge: JSON bytes in, typed values out, field-level errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from schemas.errors import BodyError, FieldError, InvalidParameter, RequestRefused, Unsupported
from schemas.records import PRIORITIES, ChatMessage
from schemas.sampling import INT64, SamplingParams
from schemas.structured import Structured, parse_response_format, parse_tool_choice, parse_tools

MAX_PROMPT_CHARS = 200_000
CHAT_ROLES = ("system", "user", "assistant", "tool")


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # Not the parser's own message: it names Python internals ("Expecting value: line 1 column 1 (char 0)",
        # "Exceeds the limit (4300 digits) for integer string conversion", ...).
        raise BodyError("body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BodyError("body must be a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, "must be an integer")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(name, "must be a number")
    return float(value) if not isinstance(value, int) or abs(value) < INT64 else math.inf


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FieldError(name, "must be a boolean")
    return value


def _bias(name: str, value: Any) -> dict[str, float]:
    """OpenAI's logit_bias: an object of token id (a JSON key) -> number; the ids' form is checked by check()."""
    if not isinstance(value, dict):
        raise FieldError(name, "must be an object of token id -> bias")
    return {str(key): _float(name, bias) for key, bias in value.items()}


def _json_text(name: str, value: Any) -> str:
    """A JSON value the record carries as compact JSON text (response_format, tools, tool_choice)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _stop(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_text(value, name),)
    if isinstance(value, list):
        return tuple(_text(s, name) for s in value)
    raise FieldError(name, "must be a string or a list of strings")


def _text(value: Any, name: str, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise FieldError(name, "must be a string")
    if len(value) > limit:
        raise FieldError(name, f"must be at most {limit} characters")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise FieldError(name, "contains a lone surrogate")
    return value


# The JSON type of each SamplingParams field (a unit test keeps the keys equal to its fields).
SAMPLING_TYPES: dict[str, Callable[[str, Any], Any]] = {
    "max_tokens": _int,
    "temperature": _float,
    "top_p": _float,
    "top_k": _int,
    "seed": _int,
    "stop": _stop,
    "presence_penalty": _float,
    "frequency_penalty": _float,
    "repetition_penalty": _float,
    "min_p": _float,
    "logit_bias": _bias,
    "n": _int,
    "logprobs": _bool,
    "top_logprobs": _int,
    "response_format": _json_text,
    "tools": _json_text,
    "tool_choice": _json_text,
}
# The SamplingParams fields the native and completions APIs take, each under its own name (the chat API also takes
# logprobs and top_logprobs so; the completions API's logprobs is a number, see parse_completions_logprobs).
SAMPLING_NAMES = {
    name: name
    for name in (
        *("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty"),
        *("frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "n"),
    )
}
CHAT_SAMPLING_NAMES = {**SAMPLING_NAMES, "logprobs": "logprobs", "top_logprobs": "top_logprobs"}
NATIVE_SAMPLING_NAMES = CHAT_SAMPLING_NAMES
MAX_COMPLETIONS_LOGPROBS = 5


def parse_sampling(
    body: Mapping[str, Any],
    max_tokens_limit: int,
    *,
    default_max_tokens: int = 16,
    names: Mapping[str, str] = SAMPLING_NAMES,
) -> SamplingParams:
    """The sampling parameters of a body: their JSON types are checked here, their ranges by SamplingParams.check.

    ``names`` maps each SamplingParams field an API takes to its name in that API's body (errors name it so too);
    a field it leaves out, or that the body leaves out or sets to null, keeps SamplingParams' default.
    """
    values: dict[str, Any] = {"max_tokens": default_max_tokens}
    for field, name in names.items():
        if (value := body.get(name)) is not None:
            values[field] = SAMPLING_TYPES[field](name, value)
    try:
        return SamplingParams(**values).check(max_tokens_limit)
    except FieldError as exc:
        raise FieldError(names.get(exc.field, exc.field), exc.reason) from None


def parse_prompt(body: dict[str, Any]) -> str:
    if "prompt" not in body:
        raise FieldError("prompt", "is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # OpenAI clients may send a one-element list
    return _text(prompt, "prompt")


def parse_messages(body: dict[str, Any]) -> tuple[ChatMessage, ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise FieldError("messages", "must be a non-empty list")
    if len(raw) > 256:
        raise FieldError("messages", "at most 256 messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in CHAT_ROLES:
            raise FieldError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, developer")
        content = m.get("content")
        calls = _tool_calls(m.get("tool_calls"), f"messages[{i}].tool_calls") if role == "assistant" else None
        if content is None and calls is not None:
            content = ""  # an assistant turn that only calls tools
        if isinstance(content, list):  # OpenAI content parts: only text parts are supported
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise FieldError(f"messages[{i}].content", "only text parts are supported")
                parts.append(_text(part.get("text"), f"messages[{i}].content"))
            content = "".join(parts)
        call_id = None
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidParameter(f"messages[{i}].tool_call_id", "is required in a tool message")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise FieldError(f"messages[{i}].name", "must be a string")
        out.append(ChatMessage(role, _text(content, f"messages[{i}].content"), calls, call_id, name))
    return tuple(out)


def _tool_calls(value: Any, field: str) -> str | None:
    """An assistant turn's ``tool_calls`` as the record carries them (OpenAI's JSON array), None when it has none."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise InvalidParameter(field, "must be a list")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidParameter(f"{field}[{j}]", 'must be {"id", "type": "function", "function": {"name", ...}}')
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise InvalidParameter(f"{field}[{j}].function.arguments", "must be a string (JSON)")
        calls.append(
            {
                "id": str(call.get("id", "")),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return json.dumps(calls, ensure_ascii=False)


def parse_structured(body: Mapping[str, Any]) -> Structured:
    """Chat's ``response_format``, ``tools`` and ``tool_choice``, as the record's fields of those names."""
    tools = parse_tools(body.get("tools"))
    return Structured(
        parse_response_format(body.get("response_format")), tools, parse_tool_choice(body.get("tool_choice"), tools)
    )


def parse_stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) of an OpenAI body; stream_options without stream is an error."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise FieldError("stream", "must be a boolean")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise BodyError("stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise FieldError("stream_options", "must be an object")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise FieldError("stream_options.include_usage", "must be a boolean")
    return stream, include


def parse_completions_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """The completions API's ``logprobs`` (a number of alternatives, 0 to 5) as the chat API's two fields; a body
    without it unchanged. Refuses what that API has and this service does not do (``echo``, ``suffix``,
    ``best_of`` other than n)."""
    for name, asks in (("echo", lambda v: v is True), ("suffix", lambda v: bool(v))):
        if asks(body.get(name)):
            raise Unsupported(name, f"{name} is not supported")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise Unsupported("best_of", "best_of is not supported (only equal to n)")
    raw = body.get("logprobs")
    out = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
    if raw is None:
        return out
    count = _int("logprobs", raw)
    if not 0 <= count <= MAX_COMPLETIONS_LOGPROBS:
        raise FieldError("logprobs", f"must be between 0 and {MAX_COMPLETIONS_LOGPROBS}")
    return {**out, "logprobs": True, "top_logprobs": count}


PRIORITY_HEADER = "X-Tokenrelay-Priority"
# OpenAI's service_tier values that name one of our classes: flex is OpenAI's slower, cheaper tier.
SERVICE_TIERS = {"auto": "interactive", "default": "interactive", "flex": "batch"}


def parse_priority(body: dict[str, Any], header: str | None) -> str:
    """The service class a request asks for, 'interactive' unless told: the native body's ``priority``, OpenAI's
    ``service_tier`` or the X-Tokenrelay-Priority header (any of them, in any API); asking for two is an error."""
    asked: dict[str, str] = {}
    priority = body.get("priority")
    if priority is not None:
        if priority not in PRIORITIES:
            raise FieldError("priority", f"must be one of {', '.join(PRIORITIES)}")
        asked["priority"] = priority
    tier = body.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str) or tier not in SERVICE_TIERS:
            raise Unsupported(
                "service_tier",
                f"must be one of {', '.join(SERVICE_TIERS)} (auto and default: interactive, flex: batch)",
            )
        asked["service_tier"] = SERVICE_TIERS[tier]
    if header is not None:
        value = header.strip().lower()
        if value not in PRIORITIES:
            raise Unsupported(PRIORITY_HEADER, f"must be one of {', '.join(PRIORITIES)}")
        asked[PRIORITY_HEADER] = value
    if len(set(asked.values())) > 1:
        raise RequestRefused(
            "the request asks for two classes: " + ", ".join(f"{k} {v}" for k, v in asked.items()),
            code="priority_conflict",
        )
    return next(iter(asked.values()), "interactive")


def parse_deadline(body: dict[str, Any], now_ms: int) -> int | None:
    """The native body's ``deadline_ms``: Unix time in ms by which the request must have started, else it ends
    ``deadline_exceeded``; None when not given."""
    raw = body.get("deadline_ms")
    if raw is None:
        return None
    value = _int("deadline_ms", raw)
    if value <= now_ms:
        raise FieldError("deadline_ms", "has passed already (it is Unix time in milliseconds)")
    return value

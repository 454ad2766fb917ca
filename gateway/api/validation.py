"""Validation of HTTP bodies at the edge: JSON bytes in, typed values out, field-level errors."""

from __future__ import annotations

import json
import math
from typing import Any

from schemas.errors import BodyError, FieldError
from schemas.records import ChatMessage
from schemas.sampling import INT64, MAX_STOP, MAX_STOP_CHARS, MAX_TOP_K, SamplingParams

MAX_PROMPT_CHARS = 200_000
CHAT_ROLES = ("system", "user", "assistant")


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


def _int(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, "must be an integer")
    if not lo <= value <= hi:
        raise FieldError(name, f"must be between {lo} and {hi}")
    return value


def _float(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(name, "must be a number")
    number = float(value) if not isinstance(value, int) or abs(value) < INT64 else math.inf
    if not math.isfinite(number) or not lo <= number <= hi:
        raise FieldError(name, f"must be between {lo} and {hi}")
    return number


def _text(value: Any, name: str, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise FieldError(name, "must be a string")
    if len(value) > limit:
        raise FieldError(name, f"must be at most {limit} characters")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise FieldError(name, "contains a lone surrogate")
    return value


def parse_sampling(body: dict[str, Any], max_tokens_limit: int, default_max_tokens: int = 16) -> SamplingParams:
    max_tokens = _int(body, "max_tokens", default_max_tokens, 1, max_tokens_limit)
    assert max_tokens is not None
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (_text(stop_raw, "stop", MAX_STOP_CHARS),)
    elif isinstance(stop_raw, list):
        if len(stop_raw) > MAX_STOP:
            raise FieldError("stop", f"at most {MAX_STOP} strings")
        stop = tuple(_text(s, "stop", MAX_STOP_CHARS) for s in stop_raw)
    else:
        raise FieldError("stop", "must be a string or a list of strings")
    if any(s == "" for s in stop):
        raise FieldError("stop", "must not contain empty strings")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        top_k=_int(body, "top_k", 0, 0, MAX_TOP_K) or 0,
        stop=stop,
        seed=_int(body, "seed", None, -(INT64), INT64 - 1),
    )


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
        if role not in CHAT_ROLES:
            raise FieldError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text parts are supported
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise FieldError(f"messages[{i}].content", "only text parts are supported")
                parts.append(_text(part.get("text"), f"messages[{i}].content"))
            content = "".join(parts)
        out.append(ChatMessage(role, _text(content, f"messages[{i}].content")))
    return tuple(out)


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


def parse_n(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise FieldError("n", "only n=1 is supported")

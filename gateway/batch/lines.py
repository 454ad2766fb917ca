"""A Batch API input file, pure: JSONL lines checked one by one, each with its line number in its error."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.batch.objects import ENDPOINTS
from schemas.errors import FieldError, TokenRelayError

MAX_CUSTOM_ID_CHARS = 512
MAX_REPORTED_ERRORS = 100


@dataclass(frozen=True, slots=True)
class InputLine:
    line: int  # 1-based, as an editor numbers it
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    code: str
    message: str
    param: str | None = None

    def as_openai(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


# The endpoint's request→record function for a line's url and body; raises the endpoint's error for a bad body.
Check = Callable[[str, dict[str, Any]], object]


def parse_lines(
    data: bytes, max_lines: int, check: Check, endpoint: str | None = None
) -> tuple[list[InputLine], list[LineError]]:
    """The lines of a JSONL file and the errors of the bad ones (at most ``MAX_REPORTED_ERRORS``).

    Blank lines are skipped (they keep their numbers). ``endpoint``, when given, is the batch's: every line must
    name it. Each body goes through ``check``, the same function its endpoint uses.
    """
    lines: list[InputLine] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= max_lines:
            errors.append(LineError(number, "too_many_lines", f"a batch file holds at most {max_lines} requests"))
            break
        try:
            line = _parse_line(number, raw, seen, endpoint)
            check(line.url, line.body)
        except LineProblem as problem:
            errors.append(problem.error)
        except TokenRelayError as exc:
            param = f"body.{exc.field}" if isinstance(exc, FieldError) else None
            errors.append(LineError(number, exc.code, exc.public_message or exc.message, param))
        else:
            lines.append(line)
            seen.add(line.custom_id)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    return lines, errors


class LineProblem(Exception):
    def __init__(self, error: LineError):
        super().__init__(str(error))
        self.error = error


def _parse_line(number: int, raw: bytes, seen: set[str], endpoint: str | None) -> InputLine:
    def problem(code: str, message: str, param: str | None = None) -> LineProblem:
        return LineProblem(LineError(number, code, message, param))

    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise problem("invalid_json_line", "this line is not valid JSON") from None
    if not isinstance(value, dict):
        raise problem("invalid_json_line", "this line is not a JSON object")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise problem(
            "invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters", "custom_id"
        )
    if custom_id in seen:
        raise problem("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", "custom_id")
    if value.get("method") != "POST":
        raise problem("invalid_method", "method must be POST", "method")
    url = value.get("url")
    if url not in ENDPOINTS:
        raise problem("invalid_url", f"url must be one of {', '.join(ENDPOINTS)}", "url")
    if endpoint is not None and url != endpoint:
        raise problem("mismatched_endpoint", f"url {url} is not the batch's endpoint {endpoint}", "url")
    body = value.get("body")
    if not isinstance(body, dict):
        raise problem("invalid_body", "body must be a JSON object", "body")
    if body.get("stream"):
        raise problem("unsupported_parameter", "stream is not supported in a batch", "body.stream")
    if body.get("background"):
        raise problem("unsupported_parameter", "background is not supported in a batch", "body.background")
    return InputLine(number, custom_id, url, body)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")

"""Structured output, pure: OpenAI's response_format, tools and tool_choice checked and normalized, and the grammar
constraint (a JSON schema or a tool-call structural tag) a request's output must follow."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from schemas.errors import InvalidParameter
from schemas.sampling import SamplingParams

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
MAX_SCHEMA_CHARS = 100_000

# The Qwen2.5 / Hermes tool-call format: what chat templates that render tools teach the model to write.
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
CALL_PREFIX = CALL_OPEN + '\n{"name": "'
ARGUMENTS_PREFIX = '", "arguments": '
CALL_SUFFIX = "}\n" + CALL_CLOSE


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a request's output must be: ``spec`` is a JSON schema (kind json_schema) or an xgrammar structural tag
    (kind structural_tag), as JSON text; one Constraint is one compiled grammar, so it is the cache key."""

    kind: Literal["json_schema", "structural_tag"]
    spec: str


JSON_OBJECT = Constraint("json_schema", '{"type": "object"}')


@dataclass(frozen=True, slots=True)
class Structured:
    """A request's response_format, tools and tool_choice as the record carries them (normalized JSON or None)."""

    response_format: str | None = None
    tools: str | None = None
    tool_choice: str | None = None

    def apply(self, params: SamplingParams) -> SamplingParams:
        return dataclasses.replace(
            params, response_format=self.response_format, tools=self.tools, tool_choice=self.tool_choice
        )


def _dumps(value: Any) -> str:
    # Keys keep their order: a schema's properties are generated in the order it declares them.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _schema(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidParameter(field, "must be a JSON schema object", code="invalid_json_schema")
    if len(_dumps(value)) > MAX_SCHEMA_CHARS:
        raise InvalidParameter(field, f"must be at most {MAX_SCHEMA_CHARS} characters", code="invalid_json_schema")
    return value


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise InvalidParameter(field, "must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -")
    return value


# --- response_format ----------------------------------------------------------------------------------------------


def parse_response_format(value: Any, field: str = "response_format") -> str | None:
    """Chat's ``response_format`` as the record carries it (normalized JSON), or None for free text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidParameter(field, "must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _dumps({"type": "json_object"})
    if kind != "json_schema":
        raise InvalidParameter(f"{field}.type", "must be one of text, json_object, json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidParameter(f"{field}.json_schema", "is required with type json_schema and must be an object")
    return _dumps(_json_schema(spec, f"{field}.json_schema"))


def parse_text_format(value: Any, field: str = "text.format") -> str | None:
    """The Responses API's ``text.format`` (flat: name, schema, strict beside type), as chat's response_format."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidParameter(field, "must be an object")
    if value.get("type") != "json_schema":
        return parse_response_format(value, field)
    return _dumps(_json_schema(value, field))


def _json_schema(spec: dict[str, Any], field: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": _name(spec.get("name"), f"{field}.name")}
    out["schema"] = _schema(spec.get("schema", {}), f"{field}.schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidParameter(f"{field}.strict", "must be a boolean")
    out["strict"] = bool(strict)
    if (description := spec.get("description")) is not None:
        if not isinstance(description, str):
            raise InvalidParameter(f"{field}.description", "must be a string")
        out["description"] = description
    return {"type": "json_schema", "json_schema": out}


def response_format_of(record_value: str | None) -> dict[str, Any] | None:
    """The record's response_format as an object (None: free text)."""
    return None if record_value is None else json.loads(record_value)


def text_format(record_value: str | None) -> dict[str, Any]:
    """A response object's ``text.format`` for the record's response_format (Responses' flat shape)."""
    fmt = response_format_of(record_value)
    if fmt is None:
        return {"type": "text"}
    if fmt["type"] == "json_schema":
        return {"type": "json_schema", **fmt["json_schema"]}
    return dict(fmt)


# --- tools and tool_choice ----------------------------------------------------------------------------------------


def parse_tools(value: Any, field: str = "tools", *, flat: bool = False) -> str | None:
    """Function tools as the record carries them: chat's shape (``{"type": "function", "function": {...}}``), from
    chat's or, ``flat``, the Responses API's (name, parameters, strict beside type). None when there are none."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidParameter(field, "must be a list")
    if len(value) > MAX_TOOLS:
        raise InvalidParameter(field, f"at most {MAX_TOOLS} tools")
    if not value:
        return None
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidParameter(f"{where}.type", "only function tools are supported")
        function = tool if flat else tool.get("function")
        if not isinstance(function, dict):
            raise InvalidParameter(f"{where}.function", "must be an object")
        prefix = where if flat else f"{where}.function"
        name = _name(function.get("name"), f"{prefix}.name")
        if name in seen:
            raise InvalidParameter(f"{prefix}.name", f"{name!r} is defined twice")
        seen.add(name)
        out: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise InvalidParameter(f"{prefix}.description", "must be a string")
            out["description"] = description
        parameters = function.get("parameters")
        out["parameters"] = _schema(parameters, f"{prefix}.parameters") if parameters is not None else {}
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidParameter(f"{prefix}.strict", "must be a boolean")
        if strict is not None:
            out["strict"] = strict
        tools.append({"type": "function", "function": out})
    return _dumps(tools)


def parse_tool_choice(value: Any, tools: str | None, field: str = "tool_choice", *, flat: bool = False) -> str | None:
    """``tool_choice`` as the record carries it: "none", "auto", "required" or a named function (chat's shape,
    from chat's or, ``flat``, the Responses API's ``{"type": "function", "name"}``); None when not given."""
    if value is None:
        return None
    names = tool_names(tools)
    if value in ("none", "auto", "required"):
        if value == "required" and not names:
            raise InvalidParameter(field, "required needs tools")
        return _dumps(value)
    if not isinstance(value, dict) or value.get("type") != "function":
        raise InvalidParameter(field, 'must be "none", "auto", "required" or a function to call')
    function = value if flat else value.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    where = f"{field}.name" if flat else f"{field}.function.name"
    if name not in names:
        raise InvalidParameter(where, f"names no tool of this request: {str(name)[:64]!r}")
    return _dumps({"type": "function", "function": {"name": name}})


def tools_of(record_value: str | None) -> list[dict[str, Any]]:
    """The record's tools (chat's shape), [] when none."""
    return [] if record_value is None else list(json.loads(record_value))


def tool_names(record_value: str | None) -> list[str]:
    return [t["function"]["name"] for t in tools_of(record_value)]


def choice_of(tools: str | None, tool_choice: str | None) -> str | dict[str, Any]:
    """The effective tool choice: "none", "auto", "required" or a named function (OpenAI's default: auto with
    tools, none without)."""
    if tool_choice is None:
        return "auto" if tools else "none"
    value: str | dict[str, Any] = json.loads(tool_choice)
    return value


def forced(tools: str | None, tool_choice: str | None) -> bool:
    """Whether the output must be a tool call (required, or a named function)."""
    return choice_of(tools, tool_choice) not in ("none", "auto")


def calls_tools(tools: str | None, tool_choice: str | None) -> bool:
    """Whether the model may write tool calls (the output is then parsed for them)."""
    return bool(tools) and choice_of(tools, tool_choice) != "none"


# --- the constraint -----------------------------------------------------------------------------------------------


def constraint_of(response_format: str | None, tools: str | None, tool_choice: str | None) -> Constraint | None:
    """The grammar the output must follow, or None for free text. A forced tool choice (required, or a named
    function) is one tool call in the ``<tool_call>`` format, its arguments valid for the function's schema; it
    wins over ``response_format``, which shapes the text answers of every other request."""
    choice = choice_of(tools, tool_choice)
    if choice not in ("none", "auto"):
        wanted = [choice["function"]["name"]] if isinstance(choice, dict) else tool_names(tools)
        tags = [_call_tag(t["function"]) for t in tools_of(tools) if t["function"]["name"] in wanted]
        body = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
        return Constraint("structural_tag", _dumps({"type": "structural_tag", "format": body}))
    fmt = response_format_of(response_format)
    if fmt is None:
        return None
    if fmt["type"] == "json_object":
        return JSON_OBJECT
    return Constraint("json_schema", _dumps(fmt["json_schema"]["schema"]))


def _call_tag(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tag",
        "begin": CALL_PREFIX + function["name"] + ARGUMENTS_PREFIX,
        # At most one blank in a row: a model cannot pad its arguments up to max_tokens.
        "content": {
            "type": "json_schema",
            "json_schema": function.get("parameters") or {"type": "object"},
            "max_whitespace_cnt": 1,
        },
        "end": CALL_SUFFIX,
    }

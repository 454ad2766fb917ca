"""Structured outputs and tool calls without a broker: the parameters, the <tool_call> parser, the grammar matcher,
and constrained generation on a real engine (valid JSON, a continued run replays its grammar state)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.errors import EngineRefused, InvalidParameter
from schemas.records import ChatMessage
from schemas.sampling import SamplingParams
from schemas.structured import (
    JSON_OBJECT,
    Constraint,
    Structured,
    constraint_of,
    parse_response_format,
    parse_text_format,
    parse_tool_choice,
    parse_tools,
)
from schemas.toolcalls import ToolCall, ToolCallParser, call_id, openai_calls, split_calls
from tests.tinymodel import build_random_qwen_tools
from workers.engine.constraints import Grammars, mask
from workers.engine.engine import Engine
from workers.engine.text import TextCodec
from workers.engine.types import EngineRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "ok"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "clock"}}


def _valid(schema: dict[str, Any], value: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(value, schema)


# --- parameters ---------------------------------------------------------------------------------------------------


def test_response_format_is_normalized_and_malformed_ones_are_400s() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert json.loads(parse_response_format({"type": "json_object"}) or "") == {"type": "json_object"}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    normalized = json.loads(parse_response_format(spec) or "")
    assert normalized["json_schema"] == {"name": "x", "schema": SCHEMA, "strict": True}
    flat = parse_text_format({"type": "json_schema", "name": "x", "schema": SCHEMA, "strict": True})
    assert flat == parse_response_format(spec)
    for bad, field in [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, "response_format.json_schema.strict"),
        ("json", "response_format"),
    ]:
        with pytest.raises(InvalidParameter) as caught:
            parse_response_format(bad)
        assert caught.value.field == field and caught.value.http_status == 400


def test_tools_and_tool_choice_in_both_shapes() -> None:
    tools = parse_tools([WEATHER, CLOCK])
    flat = parse_tools([{"type": "function", **WEATHER["function"]}, {"type": "function", "name": "clock"}], flat=True)
    assert tools == flat
    assert parse_tools([]) is None and parse_tools(None) is None
    named = parse_tool_choice({"type": "function", "function": {"name": "clock"}}, tools)
    assert named == parse_tool_choice({"type": "function", "name": "clock"}, tools, flat=True)
    assert parse_tool_choice("required", tools) == '"required"'
    with pytest.raises(InvalidParameter, match="names no tool"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(InvalidParameter, match="required needs tools"):
        parse_tool_choice("required", None)
    with pytest.raises(InvalidParameter, match="only function tools"):
        parse_tools([{"type": "web_search"}])
    with pytest.raises(InvalidParameter, match="defined twice"):
        parse_tools([CLOCK, CLOCK])
    with pytest.raises(InvalidParameter, match="a-z"):
        parse_tools([{"type": "function", "function": {"name": "has space"}}])


def test_the_constraint_a_request_asks_for() -> None:
    tools = parse_tools([WEATHER, CLOCK])
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert constraint_of(None, None, None) is None
    assert constraint_of(parse_response_format({"type": "json_object"}), None, None) == JSON_OBJECT
    assert constraint_of(fmt, None, None) == constraint_of(fmt, None, None)  # one cache key per schema
    with_tools = constraint_of(fmt, tools, None)
    assert with_tools is not None and with_tools.kind == "json_schema"
    assert constraint_of(None, tools, '"auto"') is None  # auto: free text, parsed for calls afterwards
    forced = constraint_of(fmt, tools, parse_tool_choice("required", tools))
    assert forced is not None and forced.kind == "structural_tag"  # a forced call wins over response_format
    assert json.loads(forced.spec)["format"]["type"] == "or"
    named = constraint_of(None, tools, parse_tool_choice({"type": "function", "function": {"name": "clock"}}, tools))
    assert named is not None and json.loads(named.spec)["format"]["type"] == "tag"
    params = Structured(fmt, tools, None).apply(SamplingParams(8))
    assert (params.response_format, params.tools, params.tool_choice) == (fmt, tools, None)


# --- the <tool_call> parser ---------------------------------------------------------------------------------------


def test_calls_split_from_text_whatever_the_chunking() -> None:
    text = (
        'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>{"name": "clock", "arguments": "{}"}</tool_call><tool_call>{"name": "nope"}</tool_call> <tool'
    )
    whole_text, whole_calls = split_calls(text, ["get_weather", "clock"])
    assert [(c.index, c.name, json.loads(c.arguments)) for c in whole_calls] == [
        (0, "get_weather", {"city": "Oslo"}),
        (1, "clock", {}),
    ]
    assert whole_text == 'Let me look.\n<tool_call>{"name": "nope"}</tool_call> <tool'  # unknown: text after all
    for size in (1, 2, 3, 7, 13):
        parser = ToolCallParser(["get_weather", "clock"])
        shown, calls = "", list[ToolCall]()
        for i in range(0, len(text), size):
            s, c = parser.feed(text[i : i + size])
            shown, calls = shown + s, calls + c
        s, c = parser.finish()
        assert (shown + s, calls + c) == (whole_text, whole_calls)
    cut, calls = split_calls('<tool_call>\n{"name": "clock", "arguments": {}}', ["clock"])  # the close tag cut off
    assert cut == "" and [c.name for c in calls] == ["clock"]
    assert openai_calls("0190-ab", calls)[0] == {
        "id": call_id("0190-ab", 0),
        "type": "function",
        "function": {"name": "clock", "arguments": "{}"},
    }


# --- grammars on the built-in tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_qwen_tools(tmp_path_factory.mktemp("qwen-tools"))


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> Engine:
    return Engine.load(str(qwen_dir), device="cpu", max_batch_size=8)


def test_a_matcher_masks_to_its_grammar_and_compiles_once(qwen: Engine) -> None:
    grammars = Grammars(qwen.tokenizer, 4096, qwen.eos_ids)
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    constraint = constraint_of(fmt, None, None)
    assert constraint is not None
    matcher = grammars.matcher(constraint)
    assert grammars.compiles == 1
    ids = qwen.tokenizer.encode('{"name":"ab","count":7,"ok":true}', add_special_tokens=False)
    eos = next(iter(qwen.eos_ids))
    for token in ids:
        logits = torch.zeros(1, 4096)
        mask(logits, [matcher])
        assert logits[0, token] == 0 and logits[0, eos] == float("-inf")  # no end inside the object
        assert matcher.accept(token)
    logits = torch.zeros(2, 4096)
    mask(logits, [grammars.matcher(constraint), None])
    controls = [t for t in range(4096) if any(c < " " for c in qwen.tokenizer.decode([t]))]
    assert controls and all(logits[0, t] == float("-inf") for t in controls)  # raw control characters: never JSON
    logits = torch.zeros(2, 4096)
    mask(logits, [matcher, None])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [eos]  # complete: only the end
    assert torch.isfinite(logits[1]).all()  # the row without a grammar pays nothing
    assert not matcher.accept(qwen.tokenizer.encode("x", add_special_tokens=False)[0])
    with pytest.raises(EngineRefused) as caught:
        grammars.compile(Constraint("json_schema", '{"type": "nonsense"}'))
    assert caught.value.code == "response_format_invalid"


def _run(engine: Engine, params: SamplingParams, prompt: str, resume: list[int] | None = None) -> tuple[str, str]:
    text, _, reason = _generate(engine, params, prompt, resume)
    return text, reason


def _generate(
    engine: Engine, params: SamplingParams, prompt: str, resume: list[int] | None = None
) -> tuple[str, list[int], str]:
    ids = engine.encode_prompt("", [ChatMessage("user", prompt)])
    resume = resume or []
    text = engine.decode(resume)
    out_ids, out_text, reason = engine.generate([EngineRequest("r", ids, params, resume, text)])["r"]
    return text + out_text, resume + out_ids, reason


def test_constrained_generation_is_valid_json_and_a_continued_run_replays_the_grammar(qwen: Engine) -> None:
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    params = Structured(fmt).apply(SamplingParams(64, temperature=0.0))
    text, ids, reason = _generate(qwen, params, "Give me a record")
    assert reason == "stop"
    _valid(SCHEMA, json.loads(text))
    # A run that died after 5 tokens is continued from the log: the same answer, by the grammar's replayed state.
    continued, reason = _run(qwen, params, "Give me a record", ids[:5])
    assert continued == text and reason == "stop"
    cut, reason = _run(qwen, Structured(fmt).apply(SamplingParams(4, temperature=0.0)), "Give me a record")
    assert reason == "length" and text.startswith(cut)
    sampled, _ = _run(qwen, Structured(fmt).apply(SamplingParams(64, temperature=1.0, seed=3)), "Another")
    _valid(SCHEMA, json.loads(sampled))
    json_object = Structured(parse_response_format({"type": "json_object"})).apply(SamplingParams(64, 0.0))
    obj, reason = _run(qwen, json_object, "x")
    assert obj.startswith("{") and (reason == "length" or isinstance(json.loads(obj), dict))


def test_a_forced_tool_call_is_a_valid_call(qwen: Engine) -> None:
    tools = parse_tools([WEATHER, CLOCK])
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        params = Structured(None, tools, parse_tool_choice(choice, tools)).apply(SamplingParams(64, 0.0))
        text, reason = _run(qwen, params, "Weather in Oslo?")
        shown, calls = split_calls(text, ["get_weather", "clock"])
        assert reason == "stop" and shown == "" and len(calls) == 1, text
        if isinstance(choice, dict):
            assert calls[0].name == "get_weather"
            _valid(WEATHER["function"]["parameters"], json.loads(calls[0].arguments))


def test_the_chat_template_shows_tools_or_the_request_is_refused(qwen: Engine, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tools = parse_tools([WEATHER])
    turns = [
        ChatMessage("user", "Weather in Oslo?"),
        ChatMessage(
            "assistant",
            "",
            json.dumps(
                openai_calls(
                    "r",
                    split_calls(
                        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', ["get_weather"]
                    )[1],
                )
            ),
        ),
        ChatMessage("tool", "sunny", None, call_id("r", 0), "get_weather"),
    ]
    text = qwen.decode(qwen.encode_prompt("", turns, tools))
    assert "get_weather" in text and '"arguments": {"city": "Oslo"}' in text and "sunny" in text
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(EngineRefused, match="does not show tools"):
        TextCodec(plain).encode_prompt("", turns[:1], tools)


def test_a_malformed_record_is_refused_before_it_starts(qwen: Engine) -> None:
    for fields in ({"response_format": "{not json"}, {"tools": "[]", "tool_choice": '"required"'}):
        with pytest.raises(EngineRefused) as caught:
            qwen.prepare(SamplingParams(8, **fields))  # type: ignore[arg-type]
        assert caught.value.code == "response_format_invalid"

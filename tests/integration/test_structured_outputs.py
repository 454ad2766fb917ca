"""Structured outputs and tool calls through the whole stack with the official openai SDK, on a random-weight
Qwen-style model whose chat template renders tools: parse() into Pydantic models (chat and Responses), tool-call
round trips whole and streamed, and a structured stream cut by a worker SIGKILL that resumes into valid JSON."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Annotated, Any

import openai
import pytest
from pydantic import BaseModel, Field

from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.gateway_support import GatewayProcess, gateway_settings, running_gateway, running_worker
from tests.tinymodel import build_random_qwen_tools

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SLOW_WORKER = "tests.integration.slow_worker"


class Weather(BaseModel):
    city: str = Field(max_length=8)
    degrees: int = Field(ge=-40, le=50)
    sunny: bool


class Words(BaseModel):
    words: list[Annotated[str, Field(max_length=4)]] = Field(min_length=12, max_length=12)


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "description": "Time now"}},
]
RESPONSES_TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "parameters": CITY, "strict": True}]


@dataclass
class Stack:
    settings: Settings
    gateway: GatewayProcess
    worker: subprocess.Popen[bytes]
    env: dict[str, str]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stack(plain_kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway and a (slightly slowed) worker on the tools model, for the whole module."""
    model = build_random_qwen_tools(tmp_path_factory.mktemp("qwen-tools"))
    settings = gateway_settings(plain_kafka_bootstrap, f"t{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(settings))
    env = {
        "TOKENRELAY_MODEL": str(model),
        "TOKENRELAY_SERVED_NAME": "default",
        "TOKENRELAY_DEVICE": "cpu",
        "TOKENRELAY_WORKER_SESSION_TIMEOUT_MS": "6000",
        "TOKENRELAY_TEST_STEP_DELAY_S": "0.02",
    }
    with ExitStack() as stop:
        gateway = stop.enter_context(running_gateway(settings))
        worker = stop.enter_context(running_worker(settings, SLOW_WORKER, **env))
        yield Stack(settings, gateway, worker, env)


def test_parse_returns_pydantic_objects_in_chat_and_responses(stack: Stack) -> None:
    client = stack.client()
    chat = client.chat.completions.parse(
        model="default",
        messages=[{"role": "user", "content": "The weather in Oslo?"}],
        response_format=Weather,
        max_tokens=64,
        temperature=0,
    )
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(chat.choices[0].message.parsed, Weather)
    response = client.responses.parse(
        model="default", input="The weather in Oslo?", text_format=Weather, max_output_tokens=64, temperature=0
    )
    assert response.status == "completed" and isinstance(response.output_parsed, Weather)
    # json_object: a JSON object, whatever its keys (cut by max_tokens or not, it starts as one)
    loose = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Any JSON"}],
        response_format={"type": "json_object"},
        max_tokens=16,
        temperature=0,
    )
    assert (loose.choices[0].message.content or "").startswith("{")
    # Malformed asks are OpenAI's 400s
    nameless: Any = {"type": "json_schema", "json_schema": {"schema": {}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x"}], response_format=nameless
        )
    assert caught.value.status_code == 400 and "json_schema.name" in str(caught.value)
    unknown: Any = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(openai.BadRequestError, match="names no tool"):
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x"}], tools=CHAT_TOOLS, tool_choice=unknown
        )
    with pytest.raises(openai.BadRequestError, match="cannot be compiled"):
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
        )
    client.close()


def _city(arguments: str) -> str:
    value = json.loads(arguments)
    assert set(value) == {"city"} and isinstance(value["city"], str) and len(value["city"]) <= 8
    return str(value["city"])


def test_a_chat_tool_call_round_trip_whole_and_streamed(stack: Stack) -> None:
    client = stack.client()
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model="default", messages=messages, tools=CHAT_TOOLS, tool_choice=named, max_tokens=96, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _city(call.function.arguments)

    stream = client.chat.completions.create(
        model="default",
        messages=messages,
        tools=CHAT_TOOLS,
        tool_choice=named,
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta_call.id or ""
            if delta_call.function is not None:
                entry["name"] += delta_call.function.name or ""
                entry["arguments"] += delta_call.function.arguments or ""
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons == ["tool_calls"]
    assert list(calls.values()) == [
        {"id": calls[0]["id"], "name": "get_weather", "arguments": call.function.arguments}
    ]  # the stream says what the whole answer said

    required = client.chat.completions.create(
        model="default", messages=messages, tools=CHAT_TOOLS, tool_choice="required", max_tokens=96, temperature=0
    )
    assert required.choices[0].finish_reason == "tool_calls" and required.choices[0].message.tool_calls

    # The client runs the function and sends its result; the model answers in text.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"},
    ]
    answer = client.chat.completions.create(
        model="default", messages=messages, tools=CHAT_TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    alone = client.chat.completions.create(model="default", messages=messages[:1], max_tokens=1)
    assert answer.usage is not None and alone.usage is not None
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens  # the call and its result are in the prompt
    client.close()


def test_a_responses_function_call_round_trip_whole_and_streamed(stack: Stack) -> None:
    client = stack.client()
    named: Any = {"type": "function", "name": "get_weather"}
    first = client.responses.create(
        model="default",
        input="What is the weather in Oslo?",
        tools=RESPONSES_TOOLS,
        tool_choice=named,
        max_output_tokens=96,
        temperature=0,
    )
    assert first.status == "completed", first
    [item] = first.output
    assert item.type == "function_call", first.output
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id.startswith("call_")
    _city(item.arguments)

    events = list(
        client.responses.create(
            model="default",
            input="What is the weather in Oslo?",
            tools=RESPONSES_TOOLS,
            tool_choice=named,
            max_output_tokens=96,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert getattr(done, "arguments", None) == item.arguments
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[-1] == "response.completed"

    conversation: list[Any] = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        item.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": item.call_id, "output": "sunny, 21 degrees"},
    ]
    follow_up = client.responses.create(
        model="default",
        input=conversation,
        tools=RESPONSES_TOOLS,
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,
    )
    assert follow_up.output_text and all(o.type == "message" for o in follow_up.output)
    client.close()


def test_a_structured_stream_cut_by_a_worker_sigkill_resumes_into_valid_json(stack: Stack) -> None:
    client = stack.client()
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Twelve short words"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "words", "schema": Words.model_json_schema(), "strict": True},
        },
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    text, reasons, pieces = "", [], 0
    with ExitStack() as stop:
        for chunk in stream:
            if not chunk.choices:
                continue
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
            pieces += 1
            if pieces == 6:  # mid-object: the worker dies, a new one continues the run from the log
                assert not reasons
                stack.worker.send_signal(signal.SIGKILL)
                stack.worker.wait()
                stop.enter_context(running_worker(stack.settings, SLOW_WORKER, **stack.env))
    assert pieces > 6 and stack.worker.returncode == -signal.SIGKILL  # the kill came mid-stream
    assert reasons == ["stop"], text
    Words.model_validate_json(text)
    client.close()

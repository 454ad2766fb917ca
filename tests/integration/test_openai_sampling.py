"""The OpenAI sampling options and the Responses API's state through the official openai SDK, on the built-in model.

One stack for the module: a gateway and a worker serving the default model (random-free, small, on the CPU), its
Prometheus endpoint on a free port (the prefill counter shows that n choices are prefilled once).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.local.broker.runner import free_port
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    GatewayProcess,
    gateway_settings,
    read_sse,
    running_gateway,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHAT: list[Any] = [{"role": "user", "content": "What does a worker read from Kafka?"}]


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str) -> Iterator[tuple[GatewayProcess, str]]:
    """(gateway, worker metrics URL)."""
    import asyncio
    import uuid

    settings: Settings = gateway_settings(kafka_bootstrap, f"t{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(settings))
    port = free_port()
    env = {"TOKENRELAY_MODEL": "default", "TOKENRELAY_DEVICE": "cpu", "TOKENRELAY_WORKER_METRICS_PORT": str(port)}
    with running_gateway(settings) as gw, running_worker(settings, **env):
        yield gw, f"http://127.0.0.1:{port}/metrics"


def client(stack: tuple[GatewayProcess, str]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def prefill_tokens(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "prefill_tokens_total"
    )


async def test_greedy_logprobs_rank_the_chosen_token_first_whole_and_streamed(
    stack: tuple[GatewayProcess, str],
) -> None:
    async with client(stack) as api:
        whole = await api.chat.completions.create(
            model="default",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
        choice = whole.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content
        content = choice.logprobs.content
        assert len(content) == whole.usage.completion_tokens  # type: ignore[union-attr]
        for entry in content:
            assert len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
            assert entry.logprob <= 0 and entry.bytes is not None
        assert bytes(b for entry in content for b in entry.bytes or []).decode() == choice.message.content

        stream = await api.chat.completions.create(
            model="default",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
        streamed: list[Any] = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                streamed.extend(chunk.choices[0].logprobs.content or [])
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

        legacy = await api.completions.create(
            model="default", prompt="The worker reads", max_tokens=6, temperature=0, logprobs=2
        )
        lp = legacy.choices[0].logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
        assert "".join(lp.tokens) == legacy.choices[0].text and lp.text_offset[0] == 0
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert max(top.values()) == logprob and top[token] == logprob


async def test_n_choices_come_whole_and_streamed_from_one_prefill(stack: tuple[GatewayProcess, str]) -> None:
    async with client(stack) as api:
        before = prefill_tokens(stack[1])
        whole = await api.chat.completions.create(
            model="default", messages=CHAT, max_tokens=10, temperature=1.0, seed=5, n=3
        )
        assert [c.index for c in whole.choices] == [0, 1, 2]
        assert all(c.finish_reason in ("stop", "length") for c in whole.choices)
        assert len({c.message.content for c in whole.choices}) > 1  # three draws, not one copied
        assert whole.usage is not None
        assert prefill_tokens(stack[1]) - before == whole.usage.prompt_tokens  # the prompt went through the model once

        stream = await api.completions.create(
            model="default", prompt="Kafka keeps", max_tokens=6, temperature=1.0, n=2, stream=True
        )
        texts: dict[int, str] = {}
        ends: dict[int, str] = {}
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                if c.finish_reason:
                    ends[c.index] = c.finish_reason
        assert set(texts) == set(ends) == {0, 1}


async def native_ids(session: aiohttp.ClientSession, url: str, **body: Any) -> list[int]:
    """Token ids of a request through the native API (OpenAI's answers do not show ids)."""
    async with session.post(url + "/v1/requests", json={"prompt": "The topic has a partition and", **body}) as r:
        assert r.status == 202, await r.text()
        answer = await r.json()
    status, events = await read_sse(session, url + answer["events_url"], timeout_s=120)
    assert status == 200 and events[-1]["event"] == "done", events[-1]
    return [t for e in events if e["event"] == "token" for t in json.loads(e["data"])["token_ids"]]


async def test_penalties_and_logit_bias_change_greedy_output_checkably(stack: tuple[GatewayProcess, str]) -> None:
    async with client(stack) as api:
        url = stack[0].url
        async with aiohttp.ClientSession() as session:
            plain = await native_ids(session, url, max_tokens=24, temperature=0)
            assert len(set(plain)) < len(plain)  # greedy repeats itself (the model is small)
            # Each repetition costs 2 in logit (and the first 2 more): a greedy repeat needs to win by that much.
            penalized = await native_ids(
                session, url, max_tokens=24, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
            )
            assert penalized != plain and len(set(penalized)) > len(set(plain))
            banned = await native_ids(session, url, max_tokens=24, temperature=0, logit_bias={str(plain[0]): -100})
            assert plain[0] not in banned  # a -100 bias removes the token
            forced = await native_ids(session, url, max_tokens=5, temperature=0, logit_bias={str(plain[1]): 100})
            assert forced == [plain[1]] * 5
        text = await api.completions.create(
            model="default",
            prompt="The topic has a partition and",
            max_tokens=24,
            temperature=0,
            frequency_penalty=2.0,
            presence_penalty=2.0,
        )
        assert text.choices[0].text  # the SDK's own parameters reach the sampler


async def test_bad_sampling_values_are_refused_with_the_field_named(stack: tuple[GatewayProcess, str]) -> None:
    """A value out of range is the service's 422 invalid_field (as temperature's is); what is not done, 400."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ]
    async with client(stack) as api:
        for extra, field in cases:
            with pytest.raises(openai.UnprocessableEntityError) as caught:
                await api.chat.completions.create(model="default", messages=CHAT, max_tokens=2, **extra)
            body = caught.value.body
            assert isinstance(body, dict) and body.get("code") == "invalid_field" and body.get("field") == field, extra
        with pytest.raises(openai.UnprocessableEntityError):
            await api.completions.create(model="default", prompt="x", max_tokens=2, logprobs=6)
        with pytest.raises(openai.BadRequestError) as refused:
            await api.completions.create(model="default", prompt="x", max_tokens=2, echo=True)
        assert isinstance(refused.value.body, dict) and refused.value.body.get("code") == "unsupported_parameter"


async def test_responses_state_round_trip(stack: tuple[GatewayProcess, str]) -> None:
    async with client(stack) as api:
        first = await api.responses.create(
            model="default",
            instructions="Answer briefly.",
            input="What is a topic?",
            temperature=0,
            max_output_tokens=8,
            top_logprobs=2,
            include=["message.output_text.logprobs"],
        )
        assert first.status in ("completed", "incomplete") and first.output_text
        part: Any = first.output[0].content[0]  # type: ignore[union-attr,index]
        assert part.type == "output_text" and part.logprobs and all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
        again = await api.responses.retrieve(first.id)
        kept: Any = again.output[0].content[0]  # type: ignore[union-attr,index]
        assert [(lp.token, lp.logprob) for lp in kept.logprobs] == [(lp.token, lp.logprob) for lp in part.logprobs]
        assert again.instructions == "Answer briefly." and again.temperature == 0 and again.max_output_tokens == 8
        assert again.text is not None and again.text.format is not None and again.text.format.type == "text"
        items = await api.responses.input_items.list(first.id)
        assert [(i.type, i.role) for i in items.data] == [("message", "user")]  # type: ignore[union-attr]

        second = await api.responses.create(
            model="default", previous_response_id=first.id, input="And a partition?", temperature=0, max_output_tokens=8
        )
        assert second.previous_response_id == first.id
        assert second.usage is not None and first.usage is not None
        assert second.usage.input_tokens > first.usage.input_tokens  # the earlier turns are in the prompt
        listed = await api.responses.input_items.list(second.id, order="asc")
        roles = [(i.role, i.content[0].text) for i in listed.data]  # type: ignore[union-attr,index]
        assert roles == [("user", "What is a topic?"), ("assistant", first.output_text), ("user", "And a partition?")]

        await api.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError) as gone:
            await api.responses.create(
                model="default", previous_response_id=first.id, input="more", max_output_tokens=2
            )
        assert isinstance(gone.value.body, dict) and gone.value.body.get("code") == "previous_response_not_found"
        assert (await api.responses.retrieve(second.id)).output_text == second.output_text  # its own log is whole

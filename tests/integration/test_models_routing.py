"""Two workers serving different models on one broker: routing by name, limits at the edge, refusals as 4xx."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import openai
import pytest

from services.topics import ensure_topics
from tests.integration.gateway_support import gateway_settings, read_sse, running_gateway, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TINY_CONTEXT = 256  # max_position_embeddings of the test model


async def test_each_request_is_answered_by_the_model_it_names(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings, models=["tiny", "synth"])
    tiny = str(tiny_model_dir)
    with (
        running_gateway(settings) as gw,
        running_worker(settings, TOKENRELAY_MODEL=tiny, TOKENRELAY_SERVED_NAME="tiny", TOKENRELAY_DEVICE="cpu"),
        running_worker(
            settings,
            TOKENRELAY_ENGINE="synthetic",
            TOKENRELAY_SERVED_NAME="synth",
            TOKENRELAY_SYNTHETIC_TOKENS_PER_S="500",
        ),
    ):
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/v1/models") as r:
                listed = {m["id"]: m for m in (await r.json())["data"]}
            assert set(listed) == {"tiny", "synth"}
            assert listed["tiny"]["max_model_len"] == TINY_CONTEXT and listed["tiny"]["chat_template"] is False
            assert listed["synth"]["engine"] == "synthetic"
            async with session.get(gw.url + "/readyz") as r:
                assert r.status == 200 and (await r.json())["models"] == {"tiny": 1, "synth": 1}

            for name in ("tiny", "synth", "tiny", "synth"):
                body = {"model": name, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}
                async with session.post(gw.url + "/v1/requests", json=body) as r:
                    assert r.status == 202, await r.text()
                    answer = await r.json()
                status, events = await read_sse(session, gw.url + answer["events_url"])
                started = next(json.loads(e["data"]) for e in events if e["event"] == "started")
                assert status == 200 and started["model"] == name
                assert events[-1]["event"] == "done"
                # Cancel of an ended request: 200 with its final state.
                async with session.post(f"{gw.url}/v1/requests/{answer['id']}/cancel") as r:
                    assert r.status == 200 and (await r.json())["status"] == "done"

            refusals: list[tuple[dict[str, object], int, str]] = [
                ({"model": "nope", "prompt": "x", "max_tokens": 4}, 404, "model_not_found"),
                ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 400, "chat_template_missing"),
                ({"model": "tiny", "prompt": "x", "max_tokens": TINY_CONTEXT}, 400, "context_length_exceeded"),
            ]
            for refused_body, status, code in refusals:
                async with session.post(gw.url + "/v1/requests", json=refused_body) as r:
                    assert r.status == status and (await r.json())["error"]["code"] == code, refused_body

        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
            answer = await client.completions.create(model="synth", prompt="hello", max_tokens=5)
            assert answer.model == "synth" and answer.usage is not None and answer.usage.completion_tokens == 5
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="nope", prompt="hello", max_tokens=5)
            # A prompt that fits no context: the worker refuses it, and the client gets a 400 (whole or streamed).
            long_prompt = "word " * (TINY_CONTEXT * 2)
            with pytest.raises(openai.BadRequestError) as refused:
                await client.completions.create(model="tiny", prompt=long_prompt, max_tokens=5)
            assert "context" in str(refused.value) or "prompt" in str(refused.value)
            with pytest.raises(openai.BadRequestError):
                stream = await client.completions.create(model="tiny", prompt=long_prompt, max_tokens=5, stream=True)
                async for _ in stream:
                    pass

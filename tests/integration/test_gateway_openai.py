"""The official openai client against the gateway with a real worker (synthetic engine); keys and stream tokens."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from services.topics import ensure_topics
from tests.integration.gateway_support import gateway_settings, read_sse, running_gateway, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def test_openai_client_streams_with_usage_and_keys(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-one", "key-two"))
    await ensure_topics(settings)
    with (
        running_gateway(settings) as gw,
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="200"),
    ):
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="key-one", max_retries=0, timeout=60)
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        assert chunks[0].choices[0].delta.role == "assistant"
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 8
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text

        stream = await client.completions.create(
            model="default", prompt="once", max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
        parts = [c async for c in stream]
        assert [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason] == ["length"]
        assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 5

        whole = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert whole.choices[0].finish_reason == "length" and whole.usage and whole.usage.completion_tokens == 4
        models = await client.models.list()
        assert "default" in [m.id for m in models.data]

        bad = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        await bad.close()
        await client.close()

        async with aiohttp.ClientSession() as session:
            own = {"Authorization": "Bearer key-one"}
            other = {"Authorization": "Bearer key-two"}
            async with session.post(gw.url + "/v1/requests", json={"prompt": "p", "max_tokens": 3}, headers=own) as r:
                assert r.status == 202
                answer = await r.json()
            rid = answer["id"]
            base = f"{gw.url}/v1/requests/{rid}/events"
            status, events = await read_sse(session, gw.url + answer["events_url"])
            assert status == 200 and events[-1]["event"] == "done"
            assert (await read_sse(session, base, headers=own))[1] == events
            assert (await read_sse(session, base, headers=other))[0] == 404
            assert (await read_sse(session, base))[0] == 401
            assert (await read_sse(session, base + "?token=AAAA"))[0] == 401
            async with session.get(f"{gw.url}/v1/requests/{rid}", headers=own) as r:
                assert (await r.json())["status"] == "done"

"""Gateway HTTP behaviour on a real broker: keepalive comments, CORS, 429 on backlog, cancel when a client leaves."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from schemas.ids import new_request_id
from schemas.records import Finished
from services.topics import ensure_topics
from tests.integration.gateway_support import gateway_settings, running_gateway, running_worker
from tests.integration.worker_helpers import announce, collect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ALLOWED = "https://app.example"


async def test_idle_stream_gets_keepalive_comments(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, keepalive_s=0.3)
    await ensure_topics(settings)
    with running_gateway(settings) as gw:
        url = f"{gw.url}/v1/requests/{new_request_id()}/events"  # valid, not produced: the stream stays idle
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            body = b""
            while body.count(b": keepalive\n\n") < 2:
                body += await asyncio.wait_for(response.content.readany(), 10)
    assert body.startswith(b"retry: 1000\n\n")
    assert body.replace(b"retry: 1000\n\n", b"", 1).replace(b": keepalive\n\n", b"") == b""  # nothing else


async def test_cors_allowlist(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, cors_origins=(ALLOWED,))
    await ensure_topics(settings)
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/v1/models", headers={"Origin": ALLOWED}) as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == ALLOWED and "Origin" in r.headers["Vary"]
            async with session.get(gw.url + "/v1/models", headers={"Origin": "https://evil.example"}) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
            async with session.get(gw.url + "/v1/models") as r:
                assert "Access-Control-Allow-Origin" not in r.headers

            preflight = {
                "Origin": ALLOWED,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            }
            async with session.options(gw.url + "/v1/requests", headers=preflight) as r:
                assert r.status in (200, 204)
                assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
                assert "POST" in r.headers["Access-Control-Allow-Methods"]
                allowed_headers = r.headers["Access-Control-Allow-Headers"].lower()
                assert "authorization" in allowed_headers and "content-type" in allowed_headers
            async with session.options(
                gw.url + "/v1/requests", headers={**preflight, "Origin": "https://evil.example"}
            ) as r:
                assert "Access-Control-Allow-Origin" not in r.headers

            # A streamed response (headers sent before the body) carries the header too: EventSource needs it.
            url = f"{gw.url}/v1/requests/{new_request_id()}/events"
            async with session.get(url, headers={"Origin": ALLOWED}) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ALLOWED
            async with session.get(url, headers={"Origin": "https://evil.example"}) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_429_with_retry_after_when_backlog_passes_the_limit(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, queue_limit=1)
    await ensure_topics(settings)
    await announce(settings)  # a model the gateway routes to, served by no worker
    body = {"prompt": "nobody is serving", "max_tokens": 4}
    with running_gateway(settings) as gw:  # and no worker: the backlog only grows
        async with aiohttp.ClientSession() as session:
            accepted = 0
            for _ in range(3):
                async with session.post(gw.url + "/v1/requests", json=body) as r:
                    assert r.status == 202  # the monitor has not measured a backlog over the limit yet
                    accepted += 1
            deadline = time.monotonic() + 15  # the backlog monitor polls every ~2 s
            while True:
                async with session.post(gw.url + "/v1/requests", json=body) as r:
                    if r.status == 429:
                        assert int(r.headers["Retry-After"]) >= 1
                        assert (await r.json())["error"]["code"] == "queue_full"
                        break
                    assert r.status == 202
                    accepted += 1
                assert time.monotonic() < deadline, "never refused"
                await asyncio.sleep(0.2)
            chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with session.post(gw.url + "/v1/chat/completions", json=chat) as r:
                assert r.status == 429 and "Retry-After" in r.headers
            assert accepted >= 3


async def test_openai_client_that_goes_away_cancels_generation(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    # Synthetic engine at 10 tokens/s: 200 tokens would take 20 s, so the request is surely still running.
    with (
        running_gateway(settings) as gw,
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="10"),
    ):
        body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 200, "stream": True}
        async with aiohttp.ClientSession() as session:
            response = await session.post(gw.url + "/v1/chat/completions", json=body)
            assert response.status == 200
            request_id = response.headers["X-Request-Id"]
            contents = 0
            while contents < 3:  # the role chunk, then tokens
                line = await asyncio.wait_for(response.content.readline(), 60)
                if line.startswith(b"data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    contents += bool(delta.get("content"))
            response.close()  # the client goes away mid-stream
        log = (await collect(settings, [request_id], timeout_s=30))[request_id]
        finished = log[-1].payload
        # Cancelled rather than run to its length: at 10 tokens/s the whole 200 would take 20 s.
        assert isinstance(finished, Finished) and finished.finish_reason == "cancelled"
        assert 3 <= finished.usage.completion_tokens < 200


async def test_native_submit_takes_chat_messages(kafka_bootstrap: str, topic_prefix: str) -> None:
    from schemas.codec import default_codec
    from schemas.records import ChatMessage
    from services.kafka import make_consumer, start_client

    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    await announce(settings)  # a model the gateway routes to, served by no worker
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo?"}]
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/v1/requests", json={"messages": turns, "max_tokens": 5}) as r:
                assert r.status == 202
                rid = (await r.json())["id"]
            bad = {"messages": [{"role": "robot", "content": "x"}], "max_tokens": 5}
            async with session.post(gw.url + "/v1/requests", json=bad) as r:
                assert r.status == 422
                assert (await r.json())["error"]["field"] == "messages[0].role"
    consumer = make_consumer(settings, settings.requests_topic, group_id=None)
    await start_client(consumer)
    try:
        async with asyncio.timeout(30):
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                found = [
                    req
                    for records in batch.values()
                    for req in (default_codec().decode_request(rec.value) for rec in records)
                    if req.request_id == rid
                ]
                if found:
                    break
    finally:
        await consumer.stop()
    assert found[0].messages == (ChatMessage("system", "be brief"), ChatMessage("user", "héllo?"))
    assert found[0].max_tokens == 5

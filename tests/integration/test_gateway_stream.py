"""Gateway on a real broker: resume from every cut, across a SIGKILL, 100 subscribers, bad input."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from schemas.ids import new_request_id
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    EventWriter,
    GatewayProcess,
    gateway_settings,
    read_sse,
    running_gateway,
    scripted_stream,
    wait_subscribers,
)
from tests.integration.secure_support import SECURE_TOO
from tests.integration.worker_helpers import announce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def test_resume_after_k_events_equals_whole_stream(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    rid = new_request_id()
    with running_gateway(settings) as gw:
        url = f"{gw.url}/v1/requests/{rid}/events"
        async with EventWriter(settings) as writer, aiohttp.ClientSession() as session:
            whole_task = asyncio.create_task(read_sse(session, url))
            await wait_subscribers(session, gw.url, 1)  # live fan-out, not a late read from the log
            await writer.publish(*scripted_stream(rid, 10))
            status, whole = await whole_task
            assert status == 200 and len(whole) == 12 and whole[-1]["event"] == "done"
            _late_status, late = await read_sse(session, url)
            assert late == whole
            # hub memory holds 4 events: small k resume from Kafka, large k from memory
            for k in (1, 2, 6, 11, 12):
                _, head = await read_sse(session, url, limit=k)
                assert head == whole[:k]
                status, tail = await read_sse(session, url, cursor=head[-1]["id"])
                if k == len(whole):
                    assert status == 204
                else:
                    assert status == 200 and head + tail == whole
            assert (await session.get(url, headers={"Last-Event-ID": "garbage!"})).status == 400
            metrics = await (await session.get(f"{gw.url}/metrics")).text()
            assert 'tokenrelay_gateway_replays_total{source="kafka"}' in metrics


@SECURE_TOO
async def test_resume_across_gateway_sigkill(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    rid = new_request_id()
    events = scripted_stream(rid, 12)
    gw = GatewayProcess(settings)
    gw.start()
    try:
        url = f"{gw.url}/v1/requests/{rid}/events"
        async with EventWriter(settings) as writer, aiohttp.ClientSession() as session:
            first_task = asyncio.create_task(read_sse(session, url, limit=5))
            await wait_subscribers(session, gw.url, 1)
            await writer.publish(*events[:7])
            _, first = await first_task
            gw.kill()
            await writer.publish(*events[7:10])
            gw.start()
            second_task = asyncio.create_task(read_sse(session, url, cursor=first[-1]["id"]))
            await wait_subscribers(session, gw.url, 1)
            await writer.publish(*events[10:])
            _, second = await second_task
            _, whole = await read_sse(session, url)
            assert len(whole) == 14 and first + second == whole
    finally:
        gw.stop()


async def test_hundred_subscribers_identical(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, hub_memory_events=256)
    await ensure_topics(settings)
    rid = new_request_id()
    with running_gateway(settings) as gw:
        url = f"{gw.url}/v1/requests/{rid}/events"
        connector = aiohttp.TCPConnector(limit=0)
        async with EventWriter(settings) as writer, aiohttp.ClientSession(connector=connector) as session:
            readers = [asyncio.create_task(read_sse(session, url)) for _ in range(100)]
            await wait_subscribers(session, gw.url, 100)
            for ev in scripted_stream(rid, 40):
                await writer.publish(ev)
            results = await asyncio.gather(*readers)
            streams = {json.dumps(events) for _, events in results}
            assert len(streams) == 1 and len(results[0][1]) == 42


async def test_bad_input_never_crashes(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, max_body_bytes=4096)
    await ensure_topics(settings)
    await announce(settings)  # a model the gateway routes to, served by no worker
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session:
            cases: list[tuple[str, bytes, int]] = [
                ("/v1/requests", b"\xff\xfe\x00", 400),
                ("/v1/requests", b"{not json", 400),
                ("/v1/requests", b"[]", 400),
                ("/v1/requests", b'{"prompt": 5, "max_tokens": 3}', 422),
                ("/v1/requests", b'{"prompt": "x", "max_tokens": 1e999}', 422),
                ("/v1/requests", b'{"prompt": "x", "max_tokens": 99999999999999999999999}', 422),
                ("/v1/requests", b'{"prompt": "x", "temperature": "hot"}', 422),
                ("/v1/requests", b'{"prompt": "x", "stop": [1]}', 422),
                ("/v1/requests", b'{"prompt": "' + b"x" * 5000 + b'"}', 413),
                ("/v1/requests", b"[" * 100_00, 413),
                ("/v1/chat/completions", b'{"messages": "hi"}', 422),
                (
                    "/v1/chat/completions",
                    b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {}}',
                    400,
                ),
                ("/v1/completions", b'{"prompt": "x", "n": 17}', 422),  # n is 1 to 16
            ]
            for path, body, expected in cases:
                async with session.post(gw.url + path, data=body) as response:
                    assert response.status == expected, (path, body[:60], await response.text())
                    if expected != 413 or response.content_type == "application/json":
                        assert "error" in await response.json()
            for path, expected in [
                ("/v1/requests/nope/events", 404),
                ("/v1/requests/00000000-0000-7000-8000-000000000000/events", 404),
                ("/v1/requests/%ff%fe/events", 404),
            ]:
                async with session.get(gw.url + path) as response:
                    assert response.status == expected, path
            async with session.post(gw.url + "/v1/requests", json={"prompt": "hello", "max_tokens": 4}) as response:
                assert response.status == 202
                answer = await response.json()
                assert answer["events_url"] == f"/v1/requests/{answer['id']}/events"
            assert (await session.get(gw.url + "/healthz")).status == 200
            assert (await session.get(gw.url + "/readyz")).status == 200

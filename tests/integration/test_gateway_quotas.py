"""Fair service at the edge, on the real broker: per-key quotas (one gateway and two), the class of a request, and
a queue deadline that passes while no worker serves the model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import openai
import pytest
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.auth import key_id
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from schemas.records import Failed, Finished, InferenceRequest, Started, TokenEvent, Usage
from services.kafka import make_consumer, make_producer, start_client
from services.local.broker.runner import free_port
from services.requests import submit_request
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    EventWriter,
    gateway_settings,
    running_gateway,
    running_worker,
)
from tests.integration.worker_helpers import announce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY_A, KEY_B = "key-a", "key-b"
MODEL = "queue"  # announced, but no worker runs it: what is submitted waits
WAIT_S = 30.0


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def quota_settings(bootstrap: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {"api_keys": (KEY_A, KEY_B), "default_model": MODEL, **overrides}
    return gateway_settings(bootstrap, prefix, **values)


def second_gateway(settings: Settings) -> Settings:
    return dataclasses.replace(settings, gateway_port=free_port())


async def until_model_listed(session: aiohttp.ClientSession, url: str, name: str = MODEL) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        async with session.get(url + "/v1/models", headers=auth(KEY_A)) as r:
            if name in {m["id"] for m in (await r.json())["data"]}:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"model {name} not listed by {url}")


async def submit(
    session: aiohttp.ClientSession, url: str, key: str = KEY_A, **body: Any
) -> tuple[int, Mapping[str, str], dict[str, Any]]:
    payload = {"prompt": "x" * 8, "max_tokens": 40, **body}  # reserves 2 + 40 tokens
    async with session.post(url + "/v1/requests", json=payload, headers=auth(key)) as r:
        return r.status, r.headers, await r.json()


async def until_header(session: aiohttp.ClientSession, url: str, name: str, value: str, key: str = KEY_A) -> None:
    """Until the key's answers say ``name: value`` (a settlement read back from the quotas topic)."""
    deadline = time.monotonic() + WAIT_S
    seen = None
    while time.monotonic() < deadline:
        async with session.get(url + "/v1/models", headers=auth(key)) as r:
            seen = r.headers.get(name)
        if seen == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} stayed {seen}, never {value}")


def end(rid: str, completion: int = 3) -> list[TokenEvent]:
    """What a worker writes for a request it ran: Started, then Finished with its usage (2 prompt tokens)."""
    return [
        TokenEvent(rid, "run-1", 0, 0, Started("scripted", MODEL, 2, 1)),
        TokenEvent(rid, "run-1", 1, 0, Finished("length", Usage(2, completion))),
    ]


async def test_requests_per_minute_refuse_with_openai_headers_and_every_answer_carries_them(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = quota_settings(kafka_bootstrap, topic_prefix, quota_rpm=3)
    await ensure_topics(settings, models=[MODEL])
    await announce(settings, MODEL)
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session:
            await until_model_listed(session, gw.url)
            remaining = []
            ids = []
            for _ in range(3):
                status, headers, answer = await submit(session, gw.url)
                assert status == 202, answer
                assert headers["x-ratelimit-limit-requests"] == "3"
                assert headers["x-ratelimit-reset-requests"].endswith("s")
                remaining.append(headers["x-ratelimit-remaining-requests"])
                ids.append(answer["id"])
            assert remaining == ["2", "1", "0"]
            status, headers, answer = await submit(session, gw.url)
            assert status == 429
            assert answer["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(headers["Retry-After"]) <= 60 and int(headers["retry-after-ms"]) > 0
            assert headers["x-ratelimit-remaining-requests"] == "0"
            # Every answer of the API says it, not only submits: a status read, an SSE stream's head.
            async with session.get(f"{gw.url}/v1/requests/{ids[0]}", headers=auth(KEY_A)) as r:
                assert r.status == 200 and r.headers["x-ratelimit-remaining-requests"] == "0"
                assert (await r.json())["status"] == "queued"
            async with session.get(f"{gw.url}/v1/requests/{ids[0]}/events", headers=auth(KEY_A)) as r:
                assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "3"
            # Another key has its own limit.
            status, headers, _ = await submit(session, gw.url, KEY_B)
            assert status == 202 and headers["x-ratelimit-remaining-requests"] == "2"


async def test_tokens_are_reserved_then_settled_and_concurrent_slots_free_when_requests_end(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    overrides = (f"{key_id(KEY_A)}=0/100/0", f"{KEY_B}=0/0/2")  # by key id, and by the key itself
    settings = quota_settings(kafka_bootstrap, topic_prefix, quota_overrides=overrides)
    await ensure_topics(settings, models=[MODEL])
    await announce(settings, MODEL)
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session, EventWriter(settings) as writer:
            await until_model_listed(session, gw.url)
            # Tokens: 42 each (8 characters ~ 2 tokens, + max_tokens 40); the third does not fit in 100.
            first = await submit(session, gw.url)
            second = await submit(session, gw.url)
            assert (first[0], second[0]) == (202, 202)
            assert second[1]["x-ratelimit-remaining-tokens"] == "16"
            assert "x-ratelimit-limit-requests" not in second[1]  # no requests limit for this key
            status, headers, answer = await submit(session, gw.url)
            assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
            assert "tokens" in answer["error"]["message"] and int(headers["Retry-After"]) >= 1
            # The first ends having used 5 tokens: its reservation settles to that, and the third fits.
            await writer.publish(*end(first[2]["id"]))
            await until_header(session, gw.url, "x-ratelimit-remaining-tokens", str(100 - 5 - 42))
            assert (await submit(session, gw.url))[0] == 202

            # Concurrent requests (key B: 2): queued ones count; an end frees a slot.
            b1 = await submit(session, gw.url, KEY_B)
            b2 = await submit(session, gw.url, KEY_B)
            assert (b1[0], b2[0]) == (202, 202) and b2[1]["x-ratelimit-remaining-concurrent"] == "0"
            status, headers, answer = await submit(session, gw.url, KEY_B)
            assert status == 429 and "concurrent" in answer["error"]["message"] and headers["Retry-After"] == "1"
            await writer.publish(TokenEvent(b1[2]["id"], "run-9", 0, 0, Failed("engine_error", "scripted")))
            await until_header(session, gw.url, "x-ratelimit-remaining-concurrent", "1", KEY_B)
            assert (await submit(session, gw.url, KEY_B))[0] == 202


async def test_two_gateways_never_admit_more_than_the_limit(kafka_bootstrap: str, topic_prefix: str) -> None:
    limit = 40
    one = quota_settings(kafka_bootstrap, topic_prefix, quota_rpm=limit)
    two = second_gateway(one)
    await ensure_topics(one, models=[MODEL])
    await announce(one, MODEL)
    with running_gateway(one) as gw1, running_gateway(two) as gw2:
        async with aiohttp.ClientSession() as session:
            await until_model_listed(session, gw1.url)
            await until_model_listed(session, gw2.url)
            urls = [gw1.url, gw2.url]

            async def client(i: int) -> list[int]:
                # Each client alternates gateways: both admit at the same moments, from a shared view that lags.
                return [(await submit(session, urls[(i + n) % 2]))[0] for n in range(10)]

            statuses = [s for batch in await asyncio.gather(*(client(i) for i in range(16))) for s in batch]
    admitted = statuses.count(202)
    assert statuses.count(202) + statuses.count(429) == len(statuses) == 160
    assert limit * 0.9 <= admitted <= limit, admitted  # the log decides: never above; near it all traffic being there


async def test_a_deadline_with_no_live_worker_ends_the_request_once(kafka_bootstrap: str, topic_prefix: str) -> None:
    one = gateway_settings(kafka_bootstrap, topic_prefix, default_model=MODEL)
    two = second_gateway(one)
    await ensure_topics(one, models=[MODEL, "ghost"])
    await announce(one, MODEL)
    with running_gateway(one) as gw1, running_gateway(two) as gw2:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await until_model_listed(session, gw1.url)
            body = {"prompt": "x", "max_tokens": 4, "deadline_ms": int(time.time() * 1000) + 2_000}
            async with session.post(gw1.url + "/v1/requests", json=body) as r:
                assert r.status == 202, await r.text()
                over_http = (await r.json())["id"]
            await announce(one, MODEL, ttl_ms=0)  # its (only) worker stops: nobody will take the request
            # A producer's request straight to Kafka, for a model no worker ever announced.
            direct = new_request_id()
            request = InferenceRequest(
                direct, "x", 4, model="ghost", deadline_ms=int(time.time() * 1000) + 1_000, tenant="producer"
            )
            producer = make_producer(one)
            await start_client(producer)
            try:
                await submit_request(producer, one, default_codec(), request)
            finally:
                await producer.stop()
            for rid in (over_http, direct):
                async with session.get(f"{gw2.url}/v1/requests/{rid}/events") as r:
                    text = await r.text()
                assert "event: error" in text and "deadline_exceeded" in text, text
                async with session.get(f"{gw1.url}/v1/requests/{rid}") as r:
                    state = await r.json()
                assert state["status"] == "failed" and state["error"]["code"] == "deadline_exceeded"
    ends = await terminal_records(one, [over_http, direct])
    assert ends == {over_http: ["deadline_exceeded"], direct: ["deadline_exceeded"]}


async def terminal_records(settings: Settings, request_ids: list[str]) -> dict[str, list[str]]:
    """Every Finished or Failed in the events log of each request (a second one would be a duplicate end)."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    out: dict[str, list[str]] = {rid: [] for rid in request_ids}
    try:
        tps = {TopicPartition(settings.events_topic, partition_for_key(r, settings.events_partitions)) for r in out}
        consumer.assign(list(tps))
        ends = await consumer.end_offsets(list(tps))
        await consumer.seek_to_beginning(*tps)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    rid = (record.key or b"").decode()
                    if rid in out and record.value:
                        payload = default_codec().decode_event(record.value).payload
                        if isinstance(payload, Failed):
                            out[rid].append(payload.code)
                        elif isinstance(payload, Finished):
                            out[rid].append(payload.finish_reason)
    finally:
        await consumer.stop()
    return out


async def test_the_class_is_chosen_over_http_and_shown_while_queued(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, default_model=MODEL)
    await ensure_topics(settings, models=[MODEL])
    await announce(settings, MODEL)
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session:
            await until_model_listed(session, gw.url)
            asked = [
                ({"priority": "batch"}, {}),
                ({}, {"X-Tokenrelay-Priority": "batch"}),
                ({}, {}),
            ]
            ids = []
            for body, headers in asked:
                payload = {"prompt": "hello", "max_tokens": 4, **body}
                async with session.post(gw.url + "/v1/requests", json=payload, headers=headers) as r:
                    assert r.status == 202, await r.text()
                    ids.append((await r.json())["id"])
            for rid, expected in zip(ids, ["batch", "batch", "interactive"], strict=True):
                async with session.get(f"{gw.url}/v1/requests/{rid}") as r:
                    state = await r.json()
                assert (state["status"], state["priority"]) == ("queued", expected)
            # Each went to its class's topic.
            assert await topic_keys(settings, settings.requests_topic_for(MODEL, "batch")) == set(ids[:2])
            assert ids[2] in await topic_keys(settings, settings.requests_topic_for(MODEL))
            # Queue depth per model, class and tenant, from the events log.
            async with session.get(gw.url + "/metrics") as r:
                queued = queued_samples(await r.text())
            assert queued[(MODEL, "batch", "")] == 2 and queued[(MODEL, "interactive", "")] == 1

            bad = [
                ({"priority": "urgent"}, {}, 422, "invalid_field"),
                ({}, {"X-Tokenrelay-Priority": "later"}, 400, "unsupported_parameter"),
                ({"priority": "batch"}, {"X-Tokenrelay-Priority": "interactive"}, 400, "priority_conflict"),
            ]
            for body, headers, status, code in bad:
                payload = {"prompt": "hello", "max_tokens": 4, **body}
                async with session.post(gw.url + "/v1/requests", json=payload, headers=headers) as r:
                    assert (r.status, (await r.json())["error"]["code"]) == (status, code)

        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=30) as client:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], service_tier="priority"
                )
            assert refused.value.code == "unsupported_parameter" and "service_tier" in str(refused.value)
            with pytest.raises(openai.BadRequestError):
                await client.responses.create(model=MODEL, input="hi", service_tier="scale")


async def topic_keys(settings: Settings, topic: str) -> set[str]:
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.requests_partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        keys: set[str] = set()
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                keys |= {(r.key or b"").decode() for r in records}
        return keys
    finally:
        await consumer.stop()


def queued_samples(text: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "tokenrelay_gateway_queued_requests":
            for s in family.samples:
                out[(s.labels["model"], s.labels["priority"], s.labels["tenant"])] = s.value
    return out


async def test_the_openai_sdk_sees_a_rate_limit_error_with_the_headers(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = quota_settings(kafka_bootstrap, topic_prefix, quota_rpm=1, default_model="default")
    await ensure_topics(settings)
    with (
        running_gateway(settings) as gw,
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="500"),
    ):
        async with aiohttp.ClientSession() as session:
            await until_model_listed(session, gw.url, "default")
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0, timeout=60) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "1"
            assert raw.headers["x-ratelimit-remaining-requests"] == "0"
            assert raw.parse().choices[0].finish_reason == "length"
            with pytest.raises(openai.RateLimitError) as limited:
                await client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
            headers = limited.value.response.headers
            assert limited.value.code == "rate_limit_exceeded"
            assert headers["x-ratelimit-remaining-requests"] == "0" and int(headers["retry-after"]) >= 1
            assert headers["x-ratelimit-reset-requests"].endswith("s")
            body = json.loads(limited.value.response.text)
            assert body["error"]["code"] == "rate_limit_exceeded"

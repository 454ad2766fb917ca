"""Gateways share the read of the events topic: a third joins mid-run, every stream is watched through every gateway,
then the newcomer is SIGKILLed mid-run (its partitions move), its clients resume on the others; every stream exact."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import openai
import pytest

from services.topics import ensure_topics
from tests.integration.gateway_support import (
    Followed,
    GatewayProcess,
    Tally,
    follow_sse,
    gateway_settings,
    metric,
    read_log_streams,
    read_sse,
    running_worker,
    stream_text,
    tally,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

SEED = 20261125
PARTITIONS = 6


async def wait_partitions_shared(
    session: aiohttp.ClientSession, bases: list[str], partitions: int = PARTITIONS, timeout_s: float = 90.0
) -> None:
    """Until the group has given every partition to exactly one of these gateways, and each reads some."""
    owned: list[float] = []

    async def shared() -> bool:
        nonlocal owned
        owned = [await metric(session, base, "tokenrelay_gateway_owned_partitions") for base in bases]
        return sum(owned) == partitions and all(owned)

    await wait_until(shared, lambda: f"partitions owned per gateway: {owned}", timeout_s=timeout_s, interval_s=0.2)


async def follow_across(
    session: aiohttp.ClientSession, bases: list[str], rid: str, first: int, deadline_s: float = 150.0
) -> tuple[Followed, set[str]]:
    """A client that starts on ``bases[first]`` and, when a connection fails, resumes on the next gateway with its
    Last-Event-ID (an EventSource behind a load balancer). Returns what it saw and the gateways it used."""
    total = Followed()
    used: set[str] = set()
    cursor: str | None = None
    i = first
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        base = bases[i % len(bases)]
        used.add(base)
        part = await follow_sse(session, f"{base}/v1/requests/{rid}/events", cursor=cursor, deadline_s=0.3)
        total.events += part.events
        total.connections += part.connections
        total.errors += part.errors
        if part.complete or part.ended_204:
            total.ended_204 = part.ended_204
            break
        if total.events:
            cursor = total.events[-1]["id"]
        i += 1
    return total, used


async def openai_stream(base: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """(request id, text) of one streamed chat completion through the official client."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
            )
        ]
    finally:
        await client.close()
    rid = chunks[0].id.removeprefix("chatcmpl-")
    return rid, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_a_third_gateway_joins_mid_run_then_is_sigkilled(kafka_bootstrap: str, topic_prefix: str) -> None:
    rng = random.Random(SEED)
    n_requests = 24
    settings = [
        gateway_settings(
            kafka_bootstrap,
            topic_prefix,
            events_partitions=PARTITIONS,
            hub_memory_events=16,
            gateway_session_timeout_ms=6000,
        )
        for _ in range(3)
    ]
    await ensure_topics(settings[0])
    gateways = [GatewayProcess(s) for s in settings]
    began = time.monotonic()
    try:
        for gw in gateways[:2]:
            await gw.start_async()
        bases = [gw.url for gw in gateways]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_partitions_shared(session, bases[:2])
            with running_worker(
                settings[0],
                TOKENRELAY_ENGINE="synthetic",
                TOKENRELAY_SYNTHETIC_TOKENS_PER_S="15",
                TOKENRELAY_MAX_BATCH_SIZE="64",
            ):
                ids = []
                for k in range(n_requests):  # submitted through both gateways in turn
                    body = {"prompt": "a long answer", "max_tokens": rng.randint(150, 180)}
                    async with session.post(f"{bases[k % 2]}/v1/requests", json=body) as response:
                        assert response.status == 202, await response.text()
                        ids.append((await response.json())["id"])
                watchers = {
                    (rid, g): asyncio.create_task(follow_across(session, bases, rid, g)) for rid in ids for g in (0, 1)
                }
                # OpenAI streams on the two gateways that stay up: their requests' partitions move under them.
                chats = [asyncio.create_task(openai_stream(bases[g], "hello there", 160)) for g in (0, 1, 0, 1)]
                # A third gateway joins while the streams run (partitions move to it), is watched through too...
                await gateways[2].start_async()
                await wait_partitions_shared(session, bases)
                for rid in ids:
                    watchers[(rid, 2)] = asyncio.create_task(follow_across(session, bases, rid, 2))
                # ... and is SIGKILLed mid-run: its partitions move again, its clients resume on the others.
                await asyncio.sleep(1.5)
                assert not any(t.done() for t in watchers.values()), "streams ended before the kill"
                gateways[2].kill()
                killed_at = time.monotonic()
                results = {key: await task for key, task in watchers.items()}
                chat_results = [await t for t in chats]
                survivors = bases[:2]
                moved = [await metric(session, b, "tokenrelay_gateway_owned_partitions") for b in survivors]
                upstreams = [await metric(session, b, "tokenrelay_gateway_upstream_connects_total") for b in survivors]
                all_ids = ids + [rid for rid, _ in chat_results]
                log_streams = await read_log_streams(settings[0], all_ids)
                vs_log, vs_fresh = Tally(), Tally()
                for (rid, _g), (followed, _used) in results.items():
                    vs_log.add(tally(followed.events, log_streams[rid]))
                for rid in ids:
                    status, fresh = await read_sse(session, f"{survivors[rng.randrange(2)]}/v1/requests/{rid}/events")
                    assert status == 200
                    vs_fresh.add(tally(fresh, log_streams[rid]))
                for rid, text in chat_results:
                    assert log_streams[rid] and text == stream_text(log_streams[rid]), rid
    finally:
        for gw in gateways:
            gw.stop()
    moved_clients = sum(1 for (_rid, g), _ in results.items() if g == 2)
    resumed = sum(1 for (_rid, g), (f, used) in results.items() if g == 2 and len(used) > 1)
    print(
        f"\n{n_requests} requests x 3 gateways = {len(results)} native streams + {len(chat_results)} OpenAI streams; "
        f"gateway 3 SIGKILLed {killed_at - began:.1f}s in; {resumed}/{moved_clients} of its clients resumed elsewhere; "
        f"survivors now read {moved} partitions and opened {upstreams} upstream streams\n"
        f"  against the log: {vs_log}\n  fresh reads:     {vs_fresh}"
    )
    assert sum(moved) == PARTITIONS  # the victim's partitions moved to the survivors
    assert all(upstreams)  # each survivor followed requests from the others
    assert resumed == moved_clients  # every client of the victim finished on another gateway
    assert vs_log.clean and vs_fresh.clean, (vs_log, vs_fresh)
    assert vs_log.streams == 3 * n_requests


async def test_a_gateway_follows_another_with_keys_on(kafka_bootstrap: str, topic_prefix: str) -> None:
    """With API keys, the follower reaches the owner with a stream token it signs itself (the owner trusts it)."""
    settings = [
        gateway_settings(kafka_bootstrap, topic_prefix, events_partitions=2, api_keys=("key-one",)) for _ in range(2)
    ]
    await ensure_topics(settings[0])
    gateways = [GatewayProcess(s) for s in settings]
    try:
        for gw in gateways:
            await gw.start_async()
        bases = [gw.url for gw in gateways]
        auth = {"Authorization": "Bearer key-one"}
        async with aiohttp.ClientSession() as session:
            await wait_partitions_shared(session, bases, partitions=2)
            with running_worker(settings[0], TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="100"):
                ids = []
                for _ in range(8):
                    async with session.post(
                        f"{bases[0]}/v1/requests", json={"prompt": "hi", "max_tokens": 12}, headers=auth
                    ) as response:
                        assert response.status == 202, await response.text()
                        ids.append((await response.json())["id"])
                streams = [await read_sse(session, f"{bases[1]}/v1/requests/{rid}/events", headers=auth) for rid in ids]
                followed = await metric(session, bases[1], "tokenrelay_gateway_upstream_connects_total")
                log_streams = await read_log_streams(settings[0], ids)
    finally:
        for gw in gateways:
            gw.stop()
    vs_log = Tally()
    for rid, (status, events) in zip(ids, streams, strict=True):
        assert status == 200
        vs_log.add(tally(events, log_streams[rid]))
    assert followed > 0 and vs_log.clean, (followed, vs_log)

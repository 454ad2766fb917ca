"""Gateways share the read of the events topic: a third joins mid-run, every stream is watched through every gateway,
then the newcomer is SIGKILLed mid-run (its partitions move), its clients resume on the others; every stream exact."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

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
    wait_partitions_shared,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

SEED = 20261125
PARTITIONS = 6


async def follow_across(
    session: aiohttp.ClientSession,
    bases: list[str],
    rid: str,
    first: int,
    deadline_s: float = 150.0,
    on_event: Callable[[dict[str, str]], None] | None = None,
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
        url = f"{base}/v1/requests/{rid}/events"
        part = await follow_sse(session, url, cursor=cursor, deadline_s=0.3, on_event=on_event)
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


async def submit(session: aiohttp.ClientSession, bases: list[str], n: int, rng: random.Random) -> list[str]:
    """Ids of ``n`` long requests, submitted through the given gateways in turn."""
    ids = []
    for k in range(n):
        body = {"prompt": "a long answer", "max_tokens": rng.randint(150, 180)}
        async with session.post(f"{bases[k % len(bases)]}/v1/requests", json=body) as response:
            assert response.status == 202, await response.text()
            ids.append((await response.json())["id"])
    return ids


async def test_a_third_gateway_joins_mid_run_then_is_sigkilled(kafka_bootstrap: str, topic_prefix: str) -> None:
    rng = random.Random(SEED)
    n_early, n_late = 24, 8  # streams running when the third gateway joins; streams started once it has
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
            await wait_partitions_shared(session, bases[:2], partitions=PARTITIONS)
            with running_worker(
                settings[0],
                TOKENRELAY_ENGINE="synthetic",
                TOKENRELAY_SYNTHETIC_TOKENS_PER_S="15",
                TOKENRELAY_MAX_BATCH_SIZE="64",
            ):
                early = await submit(session, bases[:2], n_early, rng)
                watchers = {
                    (rid, g): asyncio.create_task(follow_across(session, bases, rid, g))
                    for rid in early
                    for g in (0, 1)
                }
                # OpenAI streams on the two gateways that stay up: their requests' partitions move under them.
                chats = [asyncio.create_task(openai_stream(bases[g], "hello there", 160)) for g in (0, 1, 0, 1)]
                # A third gateway joins while the streams run (partitions move to it), is watched through too...
                await gateways[2].start_async()
                await wait_partitions_shared(session, bases, partitions=PARTITIONS)
                late = await submit(session, bases[:2], n_late, rng)
                tokens_via_newcomer = dict.fromkeys(late, 0)

                def counter(rid: str) -> Callable[[dict[str, str]], None]:
                    def count(event: dict[str, str]) -> None:
                        tokens_via_newcomer[rid] += event["event"] == "token"

                    return count

                for rid in early:
                    watchers[(rid, 2)] = asyncio.create_task(follow_across(session, bases, rid, 2))
                for rid in late:
                    watchers[(rid, 2)] = asyncio.create_task(
                        follow_across(session, bases, rid, 2, on_event=counter(rid))
                    )
                    for g in (0, 1):
                        watchers[(rid, g)] = asyncio.create_task(follow_across(session, bases, rid, g))
                # ... and is SIGKILLed mid-run, once the late streams flow through it: its partitions move again, and
                # every client of it still streaming resumes on the others.
                await wait_until(
                    lambda: all(tokens_via_newcomer.values()),
                    lambda: f"tokens through the third gateway per late stream: {list(tokens_via_newcomer.values())}",
                )
                live_on_victim = {key for key, task in watchers.items() if key[1] == 2 and not task.done()}
                assert {(rid, 2) for rid in late} <= live_on_victim, "the late streams ended before the kill"
                gateways[2].kill()
                killed_at = time.monotonic()
                results = {key: await task for key, task in watchers.items()}
                chat_results = [await t for t in chats]
                survivors = bases[:2]
                moved = [await metric(session, b, "tokenrelay_gateway_owned_partitions") for b in survivors]
                upstreams = [await metric(session, b, "tokenrelay_gateway_upstream_connects_total") for b in survivors]
                ids = early + late
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
    resumed = sum(1 for key in live_on_victim if len(results[key][1]) > 1)
    print(
        f"\n{n_early} + {n_late} requests x 3 gateways = {len(results)} native streams + {len(chat_results)} OpenAI "
        f"streams; gateway 3 SIGKILLed {killed_at - began:.1f}s in; {resumed}/{len(live_on_victim)} of its clients "
        f"still streaming resumed elsewhere; survivors now read {moved} partitions and opened {upstreams} upstream "
        f"streams\n  against the log: {vs_log}\n  fresh reads:     {vs_fresh}"
    )
    assert sum(moved) == PARTITIONS  # the victim's partitions moved to the survivors
    assert all(upstreams)  # each survivor followed requests from the others
    assert resumed == len(live_on_victim)  # every client of the victim still streaming finished on another gateway
    assert vs_log.clean and vs_fresh.clean, (vs_log, vs_fresh)
    assert vs_log.streams == 3 * len(ids)


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
                await gateways[0].wait_serving()  # it has read the worker's announcement: the model routes
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

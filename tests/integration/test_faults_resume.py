"""Fault tests: streams cut at random points and resumed, and a gateway SIGKILL with many live streams.

Every stream is checked three ways and the lost/duplicated counts are printed: the pieces a client got across its
connections against (1) the stream the events log implies (read straight from Kafka, not through the gateway),
(2) a fresh uninterrupted read after the end, and (3) the worker's own count, usage.completion_tokens.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import aiohttp
import pytest

from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    Followed,
    GatewayProcess,
    Tally,
    follow_sse,
    gateway_settings,
    read_log_streams,
    read_sse,
    running_gateway,
    running_worker,
    tally,
    wait_log_grows,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SEED = 20240611


async def submit_many(session: aiohttp.ClientSession, base: str, n: int, rng: random.Random) -> list[str]:
    ids = []
    for _ in range(n):
        body = {"prompt": "count the words", "max_tokens": rng.randint(30, 50)}
        async with session.post(f"{base}/v1/requests", json=body) as response:
            assert response.status == 202, await response.text()
            ids.append((await response.json())["id"])
    return ids


async def check_against_log_and_fresh_reads(
    settings: Settings, session: aiohttp.ClientSession, base: str, results: dict[str, Followed]
) -> tuple[Tally, Tally]:
    log_streams = await read_log_streams(settings, results)
    vs_log, vs_fresh = Tally(), Tally()
    for rid, followed in results.items():
        vs_log.add(tally(followed.events, log_streams[rid]))
        status, fresh = await read_sse(session, f"{base}/v1/requests/{rid}/events")
        assert status == 200
        vs_fresh.add(tally(followed.events, fresh))
    return vs_log, vs_fresh


async def test_200_streams_cut_three_times_at_random_points(kafka_bootstrap: str, topic_prefix: str) -> None:
    rng = random.Random(SEED)
    n_streams = 200
    settings = gateway_settings(kafka_bootstrap, topic_prefix, hub_memory_events=16)
    await ensure_topics(settings)
    began = time.monotonic()
    with (
        running_gateway(settings) as gw,
        running_worker(
            settings,
            TOKENRELAY_ENGINE="synthetic",
            TOKENRELAY_SYNTHETIC_TOKENS_PER_S="40",
            TOKENRELAY_MAX_BATCH_SIZE="256",
        ),
    ):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            ids = await submit_many(session, gw.url, n_streams, rng)
            # 3-5 cuts per stream, each after a random number of body bytes: often mid-event, sometimes before the
            # first event of a connection, sometimes while live and sometimes after the worker has finished.
            plans = {rid: [rng.randint(1, 400) for _ in range(rng.randint(3, 5))] for rid in ids}
            followed = await asyncio.gather(
                *(follow_sse(session, f"{gw.url}/v1/requests/{rid}/events", cut_bytes=plans[rid]) for rid in ids)
            )
            results = dict(zip(ids, followed, strict=True))
            vs_log, vs_fresh = await check_against_log_and_fresh_reads(settings, session, gw.url, results)
            # A cursor at the terminal event is a 204, which tells an EventSource to stop.
            for rid in ids[:20]:
                last = results[rid].events[-1]["id"]
                status, _ = await read_sse(session, f"{gw.url}/v1/requests/{rid}/events", cursor=last)
                assert status == 204
    cuts = [f.cuts for f in followed]
    connections = sum(f.connections for f in followed)
    print(
        f"\n{n_streams} streams, {sum(cuts)} cuts (min {min(cuts)} per stream), {connections} connections, "
        f"{vs_log.tokens} tokens in {time.monotonic() - began:.1f}s\n"
        f"  against the log:          {vs_log}\n  against a fresh read:     {vs_fresh}"
    )
    assert min(cuts) >= 3
    assert vs_log.clean and vs_fresh.clean, (vs_log, vs_fresh)
    assert vs_log.streams == n_streams and vs_log.tokens == vs_fresh.tokens


async def test_gateway_sigkill_and_restart_with_50_live_streams(kafka_bootstrap: str, topic_prefix: str) -> None:
    rng = random.Random(SEED + 1)
    n_streams = 50
    # A gateway restarted after a SIGKILL reads its partitions once the group has let its dead self go (the session
    # timeout, 6 s at the least): streams long enough to still run at the second kill.
    settings = gateway_settings(kafka_bootstrap, topic_prefix, hub_memory_events=32, gateway_session_timeout_ms=6000)
    await ensure_topics(settings)
    gw = GatewayProcess(settings)
    gw.start()
    began = time.monotonic()
    try:
        with running_worker(
            settings,
            TOKENRELAY_ENGINE="synthetic",
            TOKENRELAY_SYNTHETIC_TOKENS_PER_S="20",
            TOKENRELAY_MAX_BATCH_SIZE="64",
        ):
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                ids = []
                for _ in range(n_streams):
                    body = {"prompt": "a long answer", "max_tokens": rng.randint(300, 360)}
                    async with session.post(f"{gw.url}/v1/requests", json=body) as response:
                        assert response.status == 202
                        ids.append((await response.json())["id"])
                received = [0] * n_streams  # events each client has received

                def counter(i: int) -> Callable[[dict[str, str]], None]:
                    def count(_: dict[str, str]) -> None:
                        received[i] += 1

                    return count

                readers = [
                    asyncio.create_task(
                        follow_sse(session, f"{gw.url}/v1/requests/{rid}/events", retry_s=0.2, on_event=counter(i))
                    )
                    for i, rid in enumerate(ids)
                ]
                kills = 0
                for _ in range(2):  # two SIGKILLs while the worker is producing
                    marks = list(received)

                    def streaming(marks: list[int] = marks) -> bool:
                        return all(n > m or r.done() for n, m, r in zip(received, marks, readers, strict=True))

                    await wait_until(streaming, "every live client streaming through the (re)started gateway")
                    assert not all(r.done() for r in readers), "streams ended before the kill"
                    gw.kill()
                    kills += 1
                    await wait_log_grows(settings, n_streams)  # the worker keeps producing while no gateway is up
                    await gw.start_async()
                followed = await asyncio.gather(*readers)
                results = dict(zip(ids, followed, strict=True))
                vs_log, vs_fresh = await check_against_log_and_fresh_reads(settings, session, gw.url, results)
    finally:
        gw.stop()
    reconnects = sum(f.connections - 1 for f in followed)
    print(
        f"\n{n_streams} live streams, {kills} gateway SIGKILLs, {reconnects} reconnects, "
        f"{sum(f.errors for f in followed)} connection errors, {vs_log.tokens} tokens in "
        f"{time.monotonic() - began:.1f}s\n  against the log:      {vs_log}\n  against a fresh read: {vs_fresh}"
    )
    assert all(f.connections >= 1 + kills for f in followed), "every client should have lived through each kill"
    assert vs_log.clean and vs_fresh.clean, (vs_log, vs_fresh)
    assert vs_log.streams == n_streams


async def test_resume_on_another_gateway_instance(kafka_bootstrap: str, topic_prefix: str) -> None:
    """No sticky sessions: each reconnect of a cut stream goes to the other of two gateways."""
    rng = random.Random(SEED + 2)
    settings_a = gateway_settings(kafka_bootstrap, topic_prefix, hub_memory_events=8)
    settings_b = gateway_settings(kafka_bootstrap, topic_prefix, hub_memory_events=8)
    await ensure_topics(settings_a)
    with (
        running_gateway(settings_a) as gw_a,
        running_gateway(settings_b) as gw_b,
        running_worker(settings_a, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="40"),
    ):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            ids = await submit_many(session, gw_a.url, 20, rng)
            results: dict[str, Followed] = {}

            async def alternate(rid: str) -> Followed:
                total = Followed()
                cursor: str | None = None
                for i in range(6):
                    base = (gw_a, gw_b)[i % 2].url
                    part = await follow_sse(
                        session, f"{base}/v1/requests/{rid}/events", cursor=cursor, cut_bytes=[rng.randint(1, 300)]
                    )
                    total.events += part.events
                    total.cuts += part.cuts
                    total.connections += 1
                    if part.complete or part.ended_204:
                        break
                    cursor = total.events[-1]["id"] if total.events else cursor
                if not total.complete:
                    rest = await follow_sse(session, f"{gw_b.url}/v1/requests/{rid}/events", cursor=cursor)
                    total.events += rest.events
                return total

            for rid, res in zip(ids, await asyncio.gather(*(alternate(rid) for rid in ids)), strict=True):
                results[rid] = res
            vs_log, vs_fresh = await check_against_log_and_fresh_reads(settings_a, session, gw_b.url, results)
    print(f"\n20 streams alternating between two gateways: against the log {vs_log}; against a fresh read {vs_fresh}")
    assert vs_log.clean and vs_fresh.clean, (vs_log, vs_fresh)

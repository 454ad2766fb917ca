"""Fault test: the broker restarts mid-run under a live worker and gateway.

A separate local broker (fixed port, own data dir) is stopped and started again while requests are being submitted
over HTTP and streamed. Counted: requests acknowledged with 202 that never reached a terminal event (lost), and
tokens lost or duplicated per stream against the events log.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp
import pytest

from services.local.broker.cluster import free_port_block
from services.topics import ensure_topics
from tests.integration.brokers import LocalBrokerFactory
from tests.integration.gateway_support import (
    Followed,
    Tally,
    follow_sse,
    gateway_settings,
    read_log_streams,
    running_gateway,
    running_worker,
    tally,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PER_PHASE = 20  # requests acknowledged before the restart, and again after it


async def test_broker_restart_mid_run_loses_no_acknowledged_request(
    local_broker_factory: LocalBrokerFactory, tmp_path: Path, topic_prefix: str
) -> None:
    rng = random.Random(7)
    broker = local_broker_factory(data_dir=tmp_path / "broker", port=free_port_block(1))
    bootstrap = await asyncio.to_thread(broker.start)
    settings = gateway_settings(bootstrap, topic_prefix, hub_memory_events=16)
    await ensure_topics(settings)
    began = time.monotonic()
    acknowledged: list[str] = []
    refused: dict[int, int] = {}
    followers: dict[str, asyncio.Task[Followed]] = {}
    restart_s = 0.0
    with (
        running_gateway(settings) as gw,
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="20"),
    ):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            stop_submitting = asyncio.Event()
            submitting_now = False  # a submit is waiting for its answer
            tokens = 0

            def count(event: dict[str, str]) -> None:
                nonlocal tokens
                tokens += event["event"] == "token"

            async def submitter() -> None:
                nonlocal submitting_now
                while not stop_submitting.is_set():
                    body = {"prompt": "through a broker restart", "max_tokens": rng.randint(20, 40)}
                    submitting_now = True
                    try:
                        async with session.post(
                            f"{gw.url}/v1/requests", json=body, timeout=aiohttp.ClientTimeout(total=90)
                        ) as response:
                            if response.status == 202:
                                rid = (await response.json())["id"]
                                acknowledged.append(rid)
                                url = f"{gw.url}/v1/requests/{rid}/events"
                                followers[rid] = asyncio.create_task(
                                    follow_sse(session, url, retry_s=0.25, deadline_s=180, on_event=count)
                                )
                            else:
                                refused[response.status] = refused.get(response.status, 0) + 1
                                await response.read()
                    except (aiohttp.ClientError, TimeoutError):
                        refused[0] = refused.get(0, 0) + 1
                    submitting_now = False
                    await asyncio.sleep(0.1)  # a client submitting every 100 ms

            submitting = asyncio.create_task(submitter())
            await wait_until(
                lambda: len(acknowledged) >= PER_PHASE and tokens > 0, "requests acknowledged and streaming"
            )
            before = len(acknowledged)
            t0 = time.monotonic()
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: submitting_now, "a submit waiting while the broker is away")
            await asyncio.to_thread(broker.start)
            restart_s = time.monotonic() - t0
            back = len(acknowledged)
            await wait_until(lambda: len(acknowledged) >= back + PER_PHASE, "requests acknowledged after the restart")
            stop_submitting.set()
            await submitting
            results = {rid: await task for rid, task in followers.items()}
            log_streams = await read_log_streams(settings, results)
            healthy = (await session.get(f"{gw.url}/healthz")).status
    total = Tally()
    for rid, followed in results.items():
        total.add(tally(followed.events, log_streams[rid]))
    lost_requests = [rid for rid, f in results.items() if not f.complete]
    print(
        f"\nbroker down for {restart_s:.1f}s (stop + start); {len(acknowledged)} requests acknowledged "
        f"({before} before the restart), refused {refused or 'none'}; acknowledged without a terminal event: "
        f"{len(lost_requests)}; {sum(f.errors for f in results.values())} stream errors, "
        f"{sum(f.connections - 1 for f in results.values())} reconnects; {time.monotonic() - began:.1f}s\n"
        f"  against the log: {total}"
    )
    assert healthy == 200
    assert before > 0 and len(acknowledged) > before, "requests must be acknowledged before and after the restart"
    assert not lost_requests, lost_requests
    assert total.clean, total

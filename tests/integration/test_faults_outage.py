"""Fault test: the broker is gone for longer than the producer's delivery timeout while 20 streams run.

Sends then fail after their timeout and the idempotent producer is left with sequence numbers the broker rejects, so
the worker must stop every run that lost an event, replace its producer and take the requests up again from the log
once the broker is back. Every stream must end with exactly its text or an explicit error; none may end with
silently missing tokens, and the worker and gateway must still serve afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from services.local.broker.cluster import free_port_block
from services.topics import ensure_topics
from tests.integration.brokers import LocalBrokerFactory
from tests.integration.gateway_support import Followed, follow_sse, gateway_settings, running_gateway, running_worker
from tests.waiting import wait_until
from workers.synthetic import SyntheticEngine

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

STREAMS = 20
MAX_TOKENS = 60
TOKENS_PER_S = "10"  # 6 s per stream: the outage lands mid-stream
PRODUCER_TIMEOUT_MS = 3000


def client_text(followed: Followed) -> tuple[str, str]:
    """(text a client shows, how the stream ended) with restarts replacing the text, as the playground does."""
    text, end = "", "none"
    for ev in followed.events:
        data = json.loads(ev.get("data") or "{}")
        if ev["event"] == "started":
            text = data.get("text", "")
        elif ev["event"] == "token":
            text += data["text"]
        elif ev["event"] == "restart":
            text = data["text"]
        elif ev["event"] in ("done", "error"):
            end = ev["event"]
    return text, end


async def test_an_outage_longer_than_the_producer_timeout_loses_no_token_silently(
    local_broker_factory: LocalBrokerFactory, tmp_path: Path, topic_prefix: str
) -> None:
    broker = local_broker_factory(data_dir=tmp_path / "broker", port=free_port_block(1))
    bootstrap = await asyncio.to_thread(broker.start)
    settings = gateway_settings(bootstrap, topic_prefix, producer_timeout_ms=PRODUCER_TIMEOUT_MS)
    await ensure_topics(settings)
    expected = SyntheticEngine(1.0, 1).decode(range(MAX_TOKENS))
    with (
        running_gateway(settings) as gw,
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S=TOKENS_PER_S),
    ):
        await gw.wait_serving()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            followers = []
            tokens = [0] * STREAMS

            def counter(i: int) -> Callable[[dict[str, str]], None]:
                def count(event: dict[str, str]) -> None:
                    tokens[i] += event["event"] == "token"

                return count

            for i in range(STREAMS):
                body = {"prompt": f"through an outage {i}", "max_tokens": MAX_TOKENS}
                async with session.post(f"{gw.url}/v1/requests", json=body) as response:
                    assert response.status == 202, await response.text()
                    url = gw.url + (await response.json())["events_url"]
                follow = follow_sse(session, url, retry_s=0.5, deadline_s=300, on_event=counter(i))
                followers.append(asyncio.create_task(follow))
            await wait_until(lambda: all(tokens), lambda: f"tokens so far per stream: {tokens}")
            t0 = time.monotonic()
            await asyncio.to_thread(broker.stop)
            # The broker stays away until a send made during the outage has expired: the gateway's submit is
            # refused (503 with Retry-After, not a hang) only after its delivery timeout, and by then every send
            # the worker had in flight when the broker went away has failed too.
            async with session.post(f"{gw.url}/v1/requests", json={"prompt": "x", "max_tokens": 2}) as response:
                during = response.status
                retry_after = response.headers.get("Retry-After")
            refused_after_s = time.monotonic() - t0
            await asyncio.to_thread(broker.start)
            outage_s = time.monotonic() - t0
            results = await asyncio.gather(*followers)
            # Afterwards the stack serves as before: a fresh request runs to its end.
            async with session.post(f"{gw.url}/v1/requests", json={"prompt": "after", "max_tokens": 5}) as response:
                assert response.status == 202
                after = await follow_sse(session, gw.url + (await response.json())["events_url"], deadline_s=120)
    outcomes = [client_text(followed) for followed in results]
    exact = sum(1 for text, end in outcomes if end == "done" and text == expected)
    errors = sum(1 for _, end in outcomes if end == "error")
    wrong = [(text[:40], end) for text, end in outcomes if not (end == "error" or (end == "done" and text == expected))]
    restarts = sum(1 for f in results for ev in f.events if ev["event"] == "restart")
    print(
        f"\nbroker away {outage_s:.1f}s (producer timeout {PRODUCER_TIMEOUT_MS} ms); submit during it: {during} "
        f"after {refused_after_s:.1f}s (Retry-After {retry_after}); {STREAMS} streams: {exact} exact, "
        f"{errors} explicit errors, {restarts} restart events, {len(wrong)} wrong"
    )
    assert during == 503 and retry_after is not None
    assert not wrong, wrong
    assert client_text(after) == (SyntheticEngine(1.0, 1).decode(range(5)), "done")

"""The adversarial review's attacks, against real gateways and a real broker: a rogue member of the gateways' group,
forged announcements on the models topic, a rolling key rotation, a refused request produced straight to Kafka, and
a body whose record does not fit."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import TopicPartition

from gateway.api.auth import key_id
from gateway.cluster.group import GatewayAssignor
from gateway.fanout.sse import PREAMBLE
from gateway.fanout.subscription import make_out
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from schemas.records import Accepted, InferenceRequest, ModelInfo, TokenEvent
from schemas.view import replay
from services.kafka import make_consumer, make_producer, record_headers, start_client
from services.local.broker.runner import free_port
from services.local.process import quiet_env, spawn
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.conftest import LocalBrokerFactory
from tests.integration.gateway_support import (
    ROOT,
    EventWriter,
    gateway_settings,
    metric,
    read_sse,
    running_gateway,
    running_worker,
    scripted_stream,
)
from tests.integration.worker_helpers import wait_announced

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INJECTED = " <<INJECTED BY ROGUE GATEWAY>>"


async def until(check: object, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def rogue_member(settings: Settings) -> AsyncIterator[tuple[str, set[int]]]:
    """A process that joins the gateways' consumer group with a URL of its own and serves, for any request, a stream
    of its own text framed exactly as an owner frames it. Yields its URL and the partitions the group gave it."""

    async def stream(request: web.Request) -> web.StreamResponse:
        rid = request.match_info["id"]
        events = replay(rid, list(enumerate(scripted_stream(rid, 2))))
        body = b"".join(make_out(partition_for_key(rid, 2), rid, ev).framed for ev in events)
        return web.Response(body=PREAMBLE + body.replace(b" w1", INJECTED.encode()), content_type="text/event-stream")

    app = web.Application()
    app.router.add_get("/v1/requests/{id}/events", stream)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    consumer = make_consumer(
        settings,
        group_id=settings.gateway_group,
        partition_assignment_strategy=(GatewayAssignor(url, lambda: ()),),
        session_timeout_ms=settings.gateway_session_timeout_ms,
        heartbeat_interval_ms=max(100, settings.gateway_session_timeout_ms // 6),
    )
    await start_client(consumer)
    consumer.subscribe([settings.events_topic])

    async def poll() -> None:
        while True:
            await consumer.getmany(timeout_ms=200)

    polling = asyncio.create_task(poll())
    try:

        async def assigned() -> bool:
            return bool(consumer.assignment())

        await until(assigned, "the rogue was given no partition")
        yield url, {tp.partition for tp in consumer.assignment()}
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        await consumer.stop()
        await server.close()


def rid_in(partitions: set[int], count: int = 2) -> str:
    while True:
        rid = new_request_id()
        if partition_for_key(rid, count) in partitions:
            return rid


async def test_a_rogue_member_of_the_gateways_group_gets_nothing_relayed(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, gateway_session_timeout_ms=6000)
    await ensure_topics(settings)
    with running_gateway(settings) as gw:
        async with rogue_member(settings) as (_, taken), aiohttp.ClientSession() as session:

            async def shared() -> bool:
                return await metric(session, gw.url, "tokenrelay_gateway_owned_partitions") == 2 - len(taken)

            await until(shared, "the gateway did not give up the rogue's partitions")
            rid = rid_in(taken)
            status, events = await read_sse(session, f"{gw.url}/v1/requests/{rid}/events")
    assert status == 200
    assert not any(INJECTED.strip() in e.get("data", "") for e in events), events
    assert [e["event"] for e in events] == ["error"]
    assert json.loads(events[0]["data"])["code"] == "upstream_untrusted"


async def test_gateways_with_different_keys_follow_each_other(kafka_bootstrap: str, topic_prefix: str) -> None:
    """A rolling key rotation: one gateway has the old key first, the other only the new one."""
    common = {"stream_token_secret": "shared-by-the-cluster", "gateway_session_timeout_ms": 6000}
    old_first = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-old", "key-new"), **common)
    new_only = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-new",), **common)
    await ensure_topics(old_first)
    rids = [rid_in({0}), rid_in({1})]  # one in each partition: one of them is followed from the other gateway
    async with EventWriter(old_first) as writer:
        for rid in rids:
            accepted = TokenEvent(rid, "", 0, 0, Accepted("scripted-model", key_id("key-new")))
            await writer.publish(accepted, *scripted_stream(rid, 5))
    with running_gateway(old_first) as first, running_gateway(new_only) as second:
        async with aiohttp.ClientSession() as session:

            async def shared() -> bool:
                owned = [await metric(session, g.url, "tokenrelay_gateway_owned_partitions") for g in (first, second)]
                return owned == [1, 1]

            await until(shared, "the two gateways did not share the partitions")
            headers = {"Authorization": "Bearer key-new"}
            for rid in rids:
                status, events = await read_sse(session, f"{first.url}/v1/requests/{rid}/events", headers=headers)
                assert status == 200 and [e["event"] for e in events] == ["started"] + ["token"] * 5 + ["done"], rid


async def announce(settings: Settings, *infos: ModelInfo) -> None:
    producer = make_producer(settings)
    await start_client(producer)
    try:
        for info in infos:
            value = default_codec().encode(info)
            await producer.send_and_wait(
                settings.models_topic, value, key=info.name.encode(), headers=record_headers("ModelInfo")
            )
    finally:
        await producer.stop()


async def served_by(settings: Settings, name: str) -> ModelInfo:
    """The latest live announcement of ``name`` on the models topic."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        tp = TopicPartition(settings.models_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        found = None
        while await consumer.position(tp) < end:
            for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                info = default_codec().decode_model_info(record.value or b"")
                if info.name == name and info.live(int(time.time() * 1000)):
                    found = info
        assert found is not None, f"no live announcement of {name!r}"
        return found
    finally:
        await consumer.stop()


async def test_forged_announcements_refused_requests_and_large_bodies(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-a",), max_body_bytes=4 << 20)
    await ensure_topics(settings, models=["default", "marker"])
    headers = {"Authorization": "Bearer key-a"}
    with (
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="500"),
        running_gateway(settings) as gw,
    ):
        real = await served_by(settings, "default")
        now = int(time.time() * 1000)
        year = 365 * 86_400_000
        await announce(
            settings,
            # A withdrawal of the real worker, stamped a year ahead: it would outrank every heartbeat of it.
            ModelInfo("default", real.worker, real.context_length, now + year, ttl_ms=0),
            # A model nobody serves, whose requests topic does not exist.
            ModelInfo("ghost", "w-ghost", 2048, now, ttl_ms=600_000),
            # Read after the two above: once the gateway lists it, it has read them.
            ModelInfo("marker", "w-marker", 2048, now, ttl_ms=600_000),
        )
        async with aiohttp.ClientSession() as session:

            async def marker_listed() -> bool:
                async with session.get(gw.url + "/v1/models", headers=headers) as r:
                    return "marker" in {m["id"] for m in (await r.json())["data"]}

            await until(marker_listed, "the marker model was not listed")
            async with session.get(gw.url + "/v1/models", headers=headers) as r:
                assert {m["id"] for m in (await r.json())["data"]} == {"default", "marker"}
            async with session.post(
                gw.url + "/v1/requests", json={"prompt": "hi", "max_tokens": 4}, headers=headers
            ) as r:
                assert r.status == 202, await r.text()  # the forged withdrawal was not believed
            async with session.post(
                gw.url + "/v1/requests", json={"model": "ghost", "prompt": "hi", "max_tokens": 4}, headers=headers
            ) as r:
                body = await r.json()
                assert r.status == 404 and body["error"]["code"] == "model_not_routable", body
            async with session.get(gw.url + "/readyz") as r:
                assert r.status == 200 and await r.json() == {"status": "ready"}  # no models for a caller without key

            # 570 KB of chat turns, under the 1 MB record limit once the text travels only once.
            turns = [{"role": "user", "content": "x" * 190_000} for _ in range(3)]
            big = io.BytesIO(json.dumps({"messages": turns, "max_tokens": 4}).encode())
            async with session.post(gw.url + "/v1/requests", data=big, headers=headers) as r:
                assert r.status == 202, await r.text()
            bigger = io.BytesIO(json.dumps({"messages": turns * 3, "max_tokens": 4}).encode())
            async with session.post(gw.url + "/v1/requests", data=bigger, headers=headers) as r:
                body = await r.json()
                assert r.status == 413 and body["error"]["code"] == "record_too_large", body
                assert "Retry-After" not in r.headers

            # A request produced straight to Kafka by the tenant's own producer, refused by the worker before any
            # Started (its deadline passed): its tenant reads the failure.
            rid = new_request_id()
            request = InferenceRequest(
                rid, "hi", 4, model="default", tenant=key_id("key-a"), deadline_ms=int(time.time() * 1000) - 1
            )
            producer = make_producer(settings)
            await start_client(producer)
            try:
                await producer.send_and_wait(
                    settings.requests_topic_for("default"),
                    default_codec().encode(request),
                    key=rid.encode(),
                    headers=record_headers("InferenceRequest"),
                )
            finally:
                await producer.stop()
            answer: dict[str, object] = {}

            async def failed() -> bool:
                nonlocal answer
                async with session.get(f"{gw.url}/v1/requests/{rid}", headers=headers) as r:
                    answer = await r.json()
                    return r.status == 200 and answer["status"] == "failed"

            await until(failed, f"the tenant never saw its request fail: {answer}")
            assert answer["error"]["code"] == "deadline_exceeded"  # type: ignore[index]


async def test_readyz_says_ready_only_once_a_request_is_routed(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/readyz") as r:
                assert r.status == 503 and (await r.json())["reason"] == "no_model"  # no worker yet
            with running_worker(settings, TOKENRELAY_ENGINE="synthetic"):

                async def ready() -> bool:
                    async with session.get(gw.url + "/readyz") as r:
                        return r.status == 200

                await until(ready, "never ready with a worker serving")
                # What a load balancer does the moment /readyz says ready: the request is routed.
                async with session.post(gw.url + "/v1/requests", json={"prompt": "hi", "max_tokens": 2}) as r:
                    assert r.status == 202, await r.text()


OUTAGE_S = 15.0  # longer than the filter's 10 s interval, so a held-back count is reported


def logged_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """A synthetic-engine worker whose stderr goes to ``log_path`` (and nothing to the test's stdout)."""
    env = quiet_env(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_WORKER_METRICS_PORT="0")
    with open(log_path, "wb") as log_file:
        return spawn(
            [sys.executable, "-m", "workers.main"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file
        )


async def test_a_broker_outage_does_not_flood_the_worker_log(
    local_broker_factory: LocalBrokerFactory, tmp_path: Path, topic_prefix: str
) -> None:
    broker = local_broker_factory(data_dir=tmp_path / "broker", port=free_port())
    bootstrap = await asyncio.to_thread(broker.start)
    settings = gateway_settings(bootstrap, topic_prefix)
    await ensure_topics(settings)
    log_path = tmp_path / "worker.log"
    proc = logged_worker(settings, log_path)
    try:
        await wait_announced(settings, "default", proc=proc)
        before = len(log_path.read_bytes().splitlines())
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
        assert proc.poll() is None, "the worker died in the outage"
    finally:
        proc.kill()  # a worker asked to stop while the broker is away waits for it: not what this test is about
        await asyncio.to_thread(proc.wait, 30)
    lines = log_path.read_text(errors="replace").splitlines()[before:]
    print(f"worker log lines during a {OUTAGE_S:.0f} s outage: {len(lines)}")
    assert 0 < len(lines) < 300, lines[:20]  # was ~734,000 in 63 s
    assert any("more like this" in line for line in lines), lines[:20]

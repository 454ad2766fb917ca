"""Fault tests on a three-node cluster (RF 3, min ISR 2): a broker SIGKILLed under live streams loses nothing.

Two workers (the real engine with the built-in model, slowed per step so that streams last seconds) and a gateway
run on `tokenrelay broker --nodes 3`. Requests are submitted over HTTP before and through the fault and followed
as an EventSource would. Then the broker that leads the events partition, or separately the active controller, is
SIGKILLed. Every acknowledged request must end with exactly its greedy reference text, with no token lost or
repeated against the log; the longest stall any client saw is printed, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.sampling import SamplingParams
from services.settings import Settings
from services.topics import ensure_topics, replication_config, topic_specs
from tests.integration.cluster_support import ClusterProcess
from tests.integration.gateway_support import (
    Followed,
    Tally,
    follow_sse,
    gateway_settings,
    read_log_streams,
    running_gateway,
    tally,
)
from tests.integration.worker_helpers import wait_group_members, worker_process
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest
from workers.model.registry import ensure_default_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = (
    "The worker reads a request from the topic and",
    "Kafka keeps every event in a log so that",
    "A gateway sends tokens to the browser while",
    "The broker replicates each partition to",
    "Once upon a time there was a stream of tokens",
    "When a node fails, the cluster",
)
MAX_TOKENS = 60
BATCH = 8
INITIAL = 12  # both workers busy when the broker dies
STEP_DELAY_S = "0.1"  # ~4-6 s per generation: the kill lands mid-stream
MIN_LIVE = 6
SUBMIT_EVERY_S = 0.25
SUBMIT_AFTER_KILL_S = 8.0  # through the leader election and after


@dataclass
class Watched:
    """One acknowledged request and what its client saw, with arrival times."""

    prompt: str
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0
    terminal: bool = False
    task: asyncio.Task[Followed] | None = None

    def seen(self, event: dict[str, str]) -> None:
        self.arrivals.append(time.monotonic())
        self.tokens += event["event"] == "token"
        self.terminal = self.terminal or event["event"] in ("done", "error")

    @property
    def live(self) -> bool:
        return self.tokens > 0 and not self.terminal

    def longest_stall(self) -> float:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return max(gaps, default=0.0)


def client_text(events: Sequence[dict[str, str]]) -> tuple[str, int]:
    """The text a client shows at the end (a restart replaces it, a token appends) and the number of restarts."""
    text, restarts = "", 0
    for ev in events:
        data = json.loads(ev.get("data", "null"))
        if ev["event"] in ("started", "restart"):
            restarts += ev["event"] == "restart"
            text = data.get("text", "")
        elif ev["event"] == "token":
            text += data["text"]
    return text, restarts


def references() -> dict[str, tuple[list[int], str]]:
    """Greedy token ids and text of every prompt, straight from the engine (no Kafka)."""
    engine = Engine.load(str(ensure_default_model(progress=False)), device="cpu", max_batch_size=len(PROMPTS))
    out = engine.generate(
        [EngineRequest(str(i), engine.encode_prompt(p), SamplingParams(MAX_TOKENS, 0.0)) for i, p in enumerate(PROMPTS)]
    )
    return {p: (out[str(i)][0], out[str(i)][1]) for i, p in enumerate(PROMPTS)}


def cluster_settings(cluster: ClusterProcess, prefix: str) -> Settings:
    # One events partition: its leader carries every live stream.
    return gateway_settings(
        cluster.bootstrap,
        prefix,
        events_partitions=1,
        requests_partitions=2,
        replication_factor=3,
        min_insync_replicas=2,
        hub_memory_events=16,
    )


async def create_events_topic(settings: Settings, leader: int) -> None:
    """The events topic as ensure_topics makes it (partitions, replication and configs from settings), but with
    its preferred leader chosen."""
    spec = next(s for s in topic_specs(settings) if s.name == settings.events_topic)
    replicas = [leader, *sorted({1, 2, 3} - {leader})][: settings.replication_factor]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    spec.name,
                    -1,
                    -1,
                    replica_assignments={p: replicas for p in range(spec.partitions)},
                    topic_configs={**replication_config(settings), **spec.config},
                )
            ]
        )
    finally:
        await admin.close()


async def wait_gateway_serves(session: aiohttp.ClientSession, url: str, model: str, timeout_s: float = 120.0) -> None:
    """Until the gateway lists ``model`` (it has read a worker's announcement) and so accepts requests for it."""
    deadline = time.monotonic() + timeout_s
    listed: list[str] = []
    while time.monotonic() < deadline:
        async with session.get(f"{url}/v1/models") as response:
            listed = [m["id"] for m in (await response.json())["data"]] if response.status == 200 else []
        if model in listed:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the gateway never listed {model!r}: {listed}")


def worker_env(name: str) -> dict[str, str]:
    return {
        "TOKENRELAY_MODEL": "default",
        "TOKENRELAY_DEVICE": "cpu",
        "TOKENRELAY_MAX_BATCH_SIZE": str(BATCH),
        "TOKENRELAY_WORKER_METRICS_PORT": "0",
        "TOKENRELAY_WORKER_ID": name,
        "TOKENRELAY_WORKER_SESSION_TIMEOUT_MS": "6000",
        "TOKENRELAY_TEST_STEP_DELAY_S": STEP_DELAY_S,
    }


@pytest.mark.parametrize("victim", ["events-leader", "controller"])
async def test_sigkill_a_broker_under_live_streams(
    kafka_cluster: ClusterProcess, topic_prefix: str, victim: str
) -> None:
    cluster = kafka_cluster
    settings = cluster_settings(cluster, topic_prefix)
    topics = [settings.events_topic, settings.requests_topic]
    # The two faults apart: the events partition is led by a node that is not the active controller.
    controller = cluster.active_controller()
    await create_events_topic(settings, leader=min({1, 2, 3} - {controller}))
    await ensure_topics(settings)
    for topic in topics:
        assert await cluster.replication(topic) == (3, "2"), topic
    await cluster.wait_healed(topics)
    expected = await asyncio.to_thread(references)
    watched: dict[str, Watched] = {}
    refused: dict[int, int] = {}
    began = time.monotonic()
    with (
        worker_process(settings, "tests.integration.slow_worker", **worker_env("w1")),
        worker_process(settings, "tests.integration.slow_worker", **worker_env("w2")),
        running_gateway(settings) as gw,
    ):
        await wait_group_members(settings, 2)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_gateway_serves(session, gw.url, settings.served_model)

            async def submit(i: int) -> None:
                prompt = PROMPTS[i % len(PROMPTS)]
                body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
                try:
                    async with session.post(
                        f"{gw.url}/v1/requests", json=body, timeout=aiohttp.ClientTimeout(total=120)
                    ) as response:
                        if response.status != 202:
                            refused[response.status] = refused.get(response.status, 0) + 1
                            await response.read()
                            return
                        rid = (await response.json())["id"]
                except (aiohttp.ClientError, TimeoutError):
                    refused[0] = refused.get(0, 0) + 1
                    return
                w = watched[rid] = Watched(prompt)
                url = f"{gw.url}/v1/requests/{rid}/events"
                w.task = asyncio.create_task(follow_sse(session, url, retry_s=0.25, deadline_s=300, on_event=w.seen))

            await asyncio.gather(*(submit(i) for i in range(INITIAL)))
            deadline = time.monotonic() + 120
            while sum(w.live for w in watched.values()) < MIN_LIVE:
                assert time.monotonic() < deadline, (
                    f"never {MIN_LIVE} live streams: {len(watched)} acknowledged, refused {refused}"
                )
                await asyncio.sleep(0.05)

            stop_submitting = asyncio.Event()

            async def submitter() -> None:
                i = INITIAL
                pending = set()
                while not stop_submitting.is_set():
                    pending.add(asyncio.create_task(submit(i)))
                    i += 1
                    await asyncio.sleep(SUBMIT_EVERY_S)
                await asyncio.gather(*pending)

            leaders = await cluster.leaders(settings.events_topic)
            node = leaders[0] if victim == "events-leader" else cluster.active_controller()
            roles = ["leader of events"] if leaders[0] == node else []
            roles += ["active controller"] if cluster.active_controller() == node else []
            coordinator = await cluster.group_coordinator(settings.worker_group)
            roles += ["the workers' group coordinator"] if coordinator == node else []
            restarts_before = cluster.count(f"node {node} is back")
            submitting = asyncio.create_task(submitter())
            live_at_kill = sum(w.live for w in watched.values())
            await asyncio.sleep(0.5)
            killed_at = time.monotonic()
            cluster.kill(node)
            await asyncio.sleep(SUBMIT_AFTER_KILL_S)
            stop_submitting.set()
            await submitting
            results = {rid: await w.task for rid, w in watched.items() if w.task is not None}
            done_after_s = time.monotonic() - killed_at
            new_leader = (await cluster.leaders(settings.events_topic))[0]
            log_streams = await read_log_streams(settings, results)

    total = Tally()
    wrong_text: list[str] = []
    lost_requests: list[str] = []
    restarts = 0
    for rid, followed in results.items():
        total.add(tally(followed.events, log_streams[rid]))
        ids, text = expected[watched[rid].prompt]
        if not followed.complete or followed.events[-1]["event"] != "done":
            lost_requests.append(rid)
            continue
        shown, n = client_text(followed.events)
        restarts += n
        if shown != text or json.loads(followed.events[-1]["data"])["usage"]["completion_tokens"] != len(ids):
            wrong_text.append(rid)
    stalls = sorted(((w.longest_stall(), rid) for rid, w in watched.items()), reverse=True)
    during = [rid for rid, w in watched.items() if w.arrivals and w.arrivals[0] < killed_at]
    print(
        f"\ncluster fault: SIGKILL node {node} ({victim}; it was {', '.join(roles) or 'a follower'}) with "
        f"{live_at_kill} streams live; events leader now node {new_leader}; {len(results)} requests acknowledged "
        f"({len(during)} begun before the kill), refused {refused or 'none'}; acknowledged without done: "
        f"{len(lost_requests)}; wrong text: {len(wrong_text)}; restarts shown: {restarts}; all done "
        f"{done_after_s:.1f}s after the kill, {time.monotonic() - began:.1f}s in all\n"
        f"  longest stall a client saw: {stalls[0][0]:.2f}s (median of per-stream longest "
        f"{stalls[len(stalls) // 2][0]:.2f}s)\n  against the log: {total}"
    )
    assert live_at_kill >= MIN_LIVE
    assert not lost_requests, lost_requests
    assert not wrong_text, wrong_text
    assert total.clean, total
    # The command restarts the node it lost, and says so.
    cluster.wait_for_line(f"node {node} is back", 240, occurrences=restarts_before + 1)
    assert cluster.count(f"node {node} (127.0.0.1:{cluster.port_of(node)}) exited (code -9); restarting it") >= 1
    await cluster.wait_healed(topics)

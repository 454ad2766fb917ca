"""Fleet-wide quotas: how close two gateways hammered at once keep to a requests-per-minute limit, and what the quota
check costs a submit.

Two gateways share one limit through the quotas topic. In each round, 32 clients alternate between the two gateways
and submit as fast as they are answered, 3x the limit in all, under a fresh API key (so rounds do not share a
window); ``quota_admitted_ratio`` is admitted / limit (goal: within 10 %). Submit latency (p50 of 202 answers, one
client) is measured A/B interleaved: a gateway pair with limits far above the load against a pair with none.
No worker runs: an announced model takes the requests, which wait in Kafka (what a submit costs, not a run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import subprocess
import time
from dataclasses import dataclass

import aiohttp

from bench.support import bench_settings, bootstrap_from_env, load, pct, start_gateway, stop_process
from schemas.codec import default_codec
from schemas.records import ModelInfo
from services.kafka import make_producer, start_client
from services.local.broker.runner import free_port
from services.settings import Settings
from services.topics import ensure_topics

ROUNDS = 3
LIMITS = (60, 240)
CLIENTS = 24
LATENCY_SUBMITS = 100
ATTEMPTS = 3  # times the limit, per round
MODEL = "bench"


@dataclass
class Pair:
    name: str
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]


async def _announce(settings: Settings) -> None:
    info = ModelInfo(MODEL, "bench-announcer", 1 << 20, int(time.time() * 1000), ttl_ms=3600_000)
    producer = make_producer(settings)
    await start_client(producer)
    try:
        await producer.send_and_wait(settings.models_topic, default_codec().encode(info), key=MODEL.encode())
    finally:
        await producer.stop()


def _pair(name: str, bootstrap: str, **overrides: object) -> Pair:
    settings = bench_settings(bootstrap, default_model=MODEL, events_partitions=2, **overrides)
    asyncio.run(ensure_topics(settings, models=[MODEL]))
    asyncio.run(_announce(settings))
    second = dataclasses.replace(settings, gateway_port=free_port())
    procs = [start_gateway(settings), start_gateway(second)]
    return Pair(name, [f"http://127.0.0.1:{s.gateway_port}" for s in (settings, second)], procs)


async def _until_listed(session: aiohttp.ClientSession, url: str, key: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with session.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
            if MODEL in {m["id"] for m in (await r.json())["data"]}:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} does not list {MODEL}")


async def _submit(session: aiohttp.ClientSession, url: str, key: str) -> int:
    body = {"prompt": "bench", "max_tokens": 4}
    async with session.post(url + "/v1/requests", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def _flood(pair: Pair, key: str, attempts: int) -> tuple[int, int]:
    """(admitted, refused) of ``attempts`` submits by CLIENTS clients alternating the gateways."""
    async with aiohttp.ClientSession() as session:
        for url in pair.urls:
            await _until_listed(session, url, key)

        async def client(i: int) -> list[int]:
            n = attempts // CLIENTS
            return [await _submit(session, pair.urls[(i + k) % 2], key) for k in range(n)]

        statuses = [s for part in await asyncio.gather(*(client(i) for i in range(CLIENTS))) for s in part]
    return statuses.count(202), statuses.count(429)


async def _latency(pair: Pair, key: str) -> list[float]:
    async with aiohttp.ClientSession() as session:
        await _until_listed(session, pair.urls[0], key)
        out = []
        for _ in range(LATENCY_SUBMITS):
            began = time.perf_counter()
            if await _submit(session, pair.urls[0], key) == 202:
                out.append((time.perf_counter() - began) * 1000)
    return out


def _summary(values: list[float]) -> str:
    return f"min {min(values):.3f} / median {statistics.median(values):.3f} / max {max(values):.3f}"


def run() -> dict[str, float]:
    bootstrap = bootstrap_from_env()
    keys = tuple(f"bench-key-{i}" for i in range(ROUNDS * len(LIMITS)))
    overrides = tuple(f"{k}={LIMITS[i % len(LIMITS)]}/0/0" for i, k in enumerate(keys))
    limited = _pair("quotas", bootstrap, api_keys=(*keys, "roomy"), quota_overrides=(*overrides, "roomy=1000000//"))
    unlimited = _pair("no quotas", bootstrap, api_keys=("roomy",))
    ratios: dict[int, list[float]] = {limit: [] for limit in LIMITS}
    p50: dict[str, list[float]] = {"quotas": [], "no quotas": []}
    try:
        for r in range(ROUNDS):
            for j, limit in enumerate(LIMITS):
                key = keys[r * len(LIMITS) + j]
                admitted, refused = asyncio.run(_flood(limited, key, ATTEMPTS * limit))
                ratios[limit].append(admitted / limit)
                print(
                    f"round {r + 1} limit {limit}/min over 2 gateways: {admitted} admitted, {refused} refused "
                    f"-> {admitted / limit:.3f} of the limit; {load()}",
                    flush=True,
                )
            for pair in (limited, unlimited) if r % 2 == 0 else (unlimited, limited):
                latencies = asyncio.run(_latency(pair, "roomy"))
                p50[pair.name].append(pct(latencies, 0.5))
                print(f"round {r + 1} submit p50 {pair.name:9}: {pct(latencies, 0.5):.2f} ms", flush=True)
    finally:
        for pair in (limited, unlimited):
            for proc in pair.procs:
                stop_process(proc)
    for limit, values in ratios.items():
        print(f"admitted / limit, limit {limit}/min: {_summary(values)}")
    overhead = [a / b for a, b in zip(p50["quotas"], p50["no quotas"], strict=True)]
    print(f"submit p50 with quotas / without: {_summary(overhead)}")
    every = [v for values in ratios.values() for v in values]
    return {
        "quota_admitted_ratio_min": min(every),
        "quota_admitted_ratio_max": max(every),
        "quota_submit_p50_ratio": statistics.median(overhead),
    }


if __name__ == "__main__":
    print(run())

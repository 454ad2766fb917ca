"""Gateway benchmark: fan-out events/s to 1,000 SSE clients, hop latency, resume time, memory per idle connection."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import psutil

from bench.support import ClientResult, StreamSpec, gather_results, load, pct, spawn_clients
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import Delta, Finished, Started, TokenEvent, Usage
from services.kafka import make_producer, record_headers, start_client
from services.local.broker.runner import free_port
from services.local.process import quiet_env
from services.local.readiness import gateway_serving
from services.settings import Settings
from services.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
FANOUT_CLIENTS = int(os.environ.get("BENCH_GATEWAY_CLIENTS", "1000"))
FANOUT_EVENTS = int(os.environ.get("BENCH_GATEWAY_EVENTS", "300"))
IDLE_CONNECTIONS = int(os.environ.get("BENCH_GATEWAY_IDLE", "10000"))
RESUMES = 50
CLIENT_PROCESSES = int(os.environ.get("BENCH_GATEWAY_CLIENT_PROCESSES", "4"))
LATENCY_REQUESTS = 100  # the 1,000 clients of the latency runs watch 100 requests, 10 each
CAPACITY_START = 5_000.0  # delivered events/s of the first paced step; doubled while the gateway keeps up
CAPACITY_STEP_S = 3.0
# A step keeps up while its median latency stays within this factor of the lightest step's: past the knee,
# events queue and the delivered rate says nothing about latency any more.
CAPACITY_QUEUE_FACTOR = 3.0
LATENCY_S = 10.0


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the idle-connection client process ---------------------------------------------------------------------------


async def _idle_clients(url: str, n: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        connected = 0
        all_connected = asyncio.Event()

        async def one() -> None:
            nonlocal connected
            async with session.get(url):
                connected += 1
                if connected == n:
                    all_connected.set()
                await asyncio.sleep(3600)

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await all_connected.wait()
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for t in tasks:
            t.cancel()


def _spawn_idle(url: str, n: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_gateway", "--idle", url, str(n)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"client process failed: {line!r}")
    return proc


# --- the benchmark ------------------------------------------------------------------------------------------


async def _publish(settings: Settings, rid: str, n: int) -> None:
    """One request's events, as fast as the producer goes."""
    await _publish_paced(settings, [rid], n, None)


async def _publish_paced(settings: Settings, rids: list[str], n: int, rate: float | None) -> None:
    """n Deltas for each request, round robin, at `rate` events/s in total (None: as fast as possible).

    Each event's ts_ms is its produce time, and its text carries the same time in microseconds, so a client
    measures produce-to-receipt itself (one machine, one clock).
    """
    producer = make_producer(settings, linger_ms=1)
    await start_client(producer)
    codec = default_codec()
    headers = record_headers("TokenEvent")

    async def send(ev: TokenEvent) -> None:
        await producer.send(settings.events_topic, codec.encode(ev), key=ev.request_id.encode(), headers=headers)

    try:
        for rid in rids:
            await send(TokenEvent(rid, "run", 0, int(time.time() * 1000), Started("bench", "synthetic", 1, 0)))
        await producer.flush()
        start = time.monotonic()
        total = n * len(rids)
        for k in range(total):
            if rate is not None and k % 8 == 0:
                await asyncio.sleep(max(0.0, start + k / rate - time.monotonic()))
            i, j = divmod(k, len(rids))
            now = time.time()
            await send(TokenEvent(rids[j], "run", i + 1, int(now * 1000), Delta(f"{now:.6f}", (i,))))
        for rid in rids:
            await send(TokenEvent(rid, "run", n + 1, int(time.time() * 1000), Finished("length", Usage(1, n))))
        await producer.flush()
    finally:
        await producer.stop()


def _paced_run(settings: Settings, base: str, delivered_per_s: float, duration_s: float) -> ClientResult:
    """LATENCY_REQUESTS requests x their subscribers (1,000 clients in CLIENT_PROCESSES processes), paced."""
    rids = [new_request_id() for _ in range(LATENCY_REQUESTS)]
    per = FANOUT_CLIENTS // LATENCY_REQUESTS
    specs = [StreamSpec(f"{base}/v1/requests/{rid}/events", "read", 3) for rid in rids for _ in range(per)]
    clients = spawn_clients(specs, CLIENT_PROCESSES, latency="text")
    produce_rate = delivered_per_s / per
    n = max(5, int(produce_rate * duration_s / len(rids)))
    asyncio.run(_publish_paced(settings, rids, n, produce_rate))
    return gather_results(clients)


async def _resume_ms(url: str, cursors: list[str]) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        for cursor in cursors:
            start = time.perf_counter()
            async with session.get(url, headers={"Last-Event-ID": cursor}) as response:
                async for chunk in response.content.iter_any():
                    if b"event:" in chunk:
                        break
            out.append((time.perf_counter() - start) * 1000)
    return out


async def _all_ids(url: str) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for line in response.content:
            if line.startswith(b"id: "):
                ids.append(line[4:].strip().decode())
            if line.startswith(b"event: done"):
                break
    return ids


def run() -> dict[str, float]:
    _raise_fd_limit()
    bootstrap = os.environ.get("TOKENRELAY_KAFKA_BOOTSTRAP") or os.environ.get("TOKENRELAY_TEST_KAFKA")
    if not bootstrap:
        raise SystemExit("set TOKENRELAY_KAFKA_BOOTSTRAP (or run `python -m bench`, which starts a broker)")
    port = free_port()
    settings = Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
        gateway_port=port,
        subscriber_buffer=4096,
    )
    asyncio.run(ensure_topics(settings))
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.main"], cwd=ROOT, env=quiet_env(settings))
    base = f"http://127.0.0.1:{port}"
    results: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 60
        while not gateway_serving(base):
            if time.monotonic() > deadline:
                raise RuntimeError("gateway not serving after 60 s")
            time.sleep(0.2)

        # 1. fan-out throughput: one request, FANOUT_CLIENTS subscribers in several client processes, events
        #    published as fast as possible (the gateway writes them in batches: its saturation figure)
        rid = new_request_id()
        url = f"{base}/v1/requests/{rid}/events"
        clients = spawn_clients([StreamSpec(url) for _ in range(FANOUT_CLIENTS)], CLIENT_PROCESSES)
        asyncio.run(_publish(settings, rid, FANOUT_EVENTS))
        r = gather_results(clients)
        results["gateway_events_per_s"] = r.events_per_s
        print(
            f"fan-out: {r.events:,} events to {FANOUT_CLIENTS} clients in {CLIENT_PROCESSES} processes: "
            f"{r.events_per_s:,.0f} events/s; {load()}",
            flush=True,
        )

        # 2. capacity with a paced producer (every event written on its own, the costly case), then latency at half
        per = FANOUT_CLIENTS // LATENCY_REQUESTS
        print(f"paced: {LATENCY_REQUESTS} requests x {per} subscribers, clients in {CLIENT_PROCESSES} processes")
        capacity = 0.0
        offered = CAPACITY_START
        base_p50: float | None = None
        while offered <= r.events_per_s:
            paced = _paced_run(settings, base, offered, CAPACITY_STEP_S)
            delivered = paced.events_per_s
            p50 = pct(paced.latencies_ms, 0.5)
            base_p50 = p50 if base_p50 is None else base_p50
            # Keeping up: (nearly) the offered rate arrives and latency has not started to queue up.
            kept_up = delivered >= 0.95 * offered and p50 <= CAPACITY_QUEUE_FACTOR * base_p50 and paced.ended_early == 0
            print(
                f"  offered {offered:,.0f} events/s: delivered {delivered:,.0f}/s, p50 {p50:.1f} ms, p99 "
                f"{pct(paced.latencies_ms, 0.99):.1f} ms -> {'keeps up' if kept_up else 'saturated'}; {load()}",
                flush=True,
            )
            capacity = max(capacity, delivered if kept_up else 0.0)
            if not kept_up:
                capacity = capacity or delivered
                break
            offered *= 2
        results["paced_capacity_events_per_s"] = capacity
        half = capacity / 2
        paced = _paced_run(settings, base, half, LATENCY_S)
        lat = paced.latencies_ms
        results["hop_latency_ms_p50"] = pct(lat, 0.5)
        results["hop_latency_ms_p99"] = pct(lat, 0.99)
        print(
            f"produce-to-receipt at half of capacity ({half:,.0f} events/s delivered, {paced.events_per_s:,.0f} "
            f"measured): p50 {results['hop_latency_ms_p50']:.1f} ms, p99 {results['hop_latency_ms_p99']:.1f} ms "
            f"({len(lat):,} samples); {load()}",
            flush=True,
        )

        # 3. resume: recent cursors come from memory; early cursors of a long stream replay from Kafka
        rid = new_request_id()
        asyncio.run(_publish(settings, rid, settings.hub_memory_events * 2 + 50))
        url = f"{base}/v1/requests/{rid}/events"
        ids = asyncio.run(_all_ids(url))
        mem = asyncio.run(_resume_ms(url, [ids[-10 - i % 5] for i in range(RESUMES)]))
        kafka = asyncio.run(_resume_ms(url, [ids[2 + i % 5] for i in range(RESUMES)]))
        results["resume_ms_p50_memory"] = statistics.median(mem)
        results["resume_ms_p99_memory"] = pct(mem, 0.99)
        results["resume_ms_p50_kafka"] = statistics.median(kafka)
        results["resume_ms_p99_kafka"] = pct(kafka, 0.99)
        print(
            f"resume first event: memory p50 {statistics.median(mem):.1f} / p99 {pct(mem, 0.99):.1f} ms; "
            f"kafka p50 {statistics.median(kafka):.1f} / p99 {pct(kafka, 0.99):.1f} ms",
            flush=True,
        )

        # 4. memory per idle connection
        gw_proc = psutil.Process(gateway.pid)
        before = gw_proc.memory_info().rss
        rid = new_request_id()
        idle = _spawn_idle(f"{base}/v1/requests/{rid}/events", IDLE_CONNECTIONS)
        time.sleep(2)
        after = gw_proc.memory_info().rss
        assert idle.stdin is not None
        idle.stdin.write("\n")
        idle.stdin.flush()
        idle.communicate(timeout=120)
        results["idle_conn_kb"] = (after - before) / IDLE_CONNECTIONS / 1024
        print(f"idle connections: {IDLE_CONNECTIONS}: {results['idle_conn_kb']:.1f} KB each (gateway RSS delta)")
    finally:
        gateway.terminate()
        gateway.wait(30)
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--idle":
        _raise_fd_limit()
        asyncio.run(_idle_clients(sys.argv[2], int(sys.argv[3])))
    else:
        print(json.dumps(run(), indent=2))

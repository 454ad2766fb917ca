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
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import Delta, Finished, Started, TokenEvent, Usage
from services.kafka import make_producer, record_headers, start_client
from services.localbroker.runner import free_port
from services.settings import Settings
from services.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
FANOUT_CLIENTS = int(os.environ.get("BENCH_GATEWAY_CLIENTS", "1000"))
FANOUT_EVENTS = int(os.environ.get("BENCH_GATEWAY_EVENTS", "300"))
IDLE_CONNECTIONS = int(os.environ.get("BENCH_GATEWAY_IDLE", "10000"))
RESUMES = 50


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the client process -------------------------------------------------------------------------------------


async def _clients(url: str, n: int, idle: bool) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        connected = 0
        all_connected = asyncio.Event()
        first: list[float] = []
        last: list[float] = []
        latencies: list[float] = []
        count = 0

        async def one(i: int) -> None:
            nonlocal connected, count
            async with session.get(url) as response:
                connected += 1
                if connected == n:
                    all_connected.set()
                if idle:
                    await asyncio.sleep(3600)
                buffer = b""
                async for chunk in response.content.iter_any():
                    now = time.time()
                    buffer += chunk
                    *blocks, buffer = buffer.split(b"\n\n")
                    for block in blocks:
                        if b"event: token" in block:
                            count += 1
                            if not first or now < first[0]:
                                first[:] = [now]
                            last[:] = [max(last[0], now) if last else now]
                            if i % 50 == 0:
                                data = json.loads(block.split(b"data: ", 1)[1])
                                latencies.append((now - float(data["text"])) * 1000)
                        elif b"event: done" in block:
                            return

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await all_connected.wait()
        print("READY", flush=True)
        if idle:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            for t in tasks:
                t.cancel()
            return {}
        await asyncio.gather(*tasks)
        return {"count": count, "first": first[0], "last": last[0], "latencies": latencies}


def _client_main(url: str, n: int, idle: bool) -> None:
    _raise_fd_limit()
    print("RESULT " + json.dumps(asyncio.run(_clients(url, n, idle))), flush=True)


def _spawn_clients(url: str, n: int, idle: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_gateway", "--clients", url, str(n), "idle" if idle else "read"],
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


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line.removeprefix("RESULT ")))
    raise RuntimeError("client process gave no result")


# --- the benchmark ------------------------------------------------------------------------------------------


async def _publish(settings: Settings, rid: str, n: int, rate: float | None = None) -> None:
    producer = make_producer(settings, linger_ms=2)
    await start_client(producer)
    codec = default_codec()

    async def send(ev: TokenEvent) -> None:
        await producer.send(
            settings.events_topic, codec.encode(ev), key=rid.encode(), headers=record_headers("TokenEvent")
        )

    try:
        await send(TokenEvent(rid, "run", 0, int(time.time() * 1000), Started("bench", "synthetic", 1, 0)))
        start = time.monotonic()
        for i in range(1, n + 1):
            if rate is not None:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            now = time.time()
            # The text carries the publish time, so the client measures produce-to-deliver itself.
            await send(TokenEvent(rid, "run", i, int(now * 1000), Delta(f"{now:.6f}", (i,))))
        await send(TokenEvent(rid, "run", n + 1, int(time.time() * 1000), Finished("length", Usage(1, n))))
        await producer.flush()
    finally:
        await producer.stop()


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
    env = dict(os.environ)
    env.update(
        TOKENRELAY_KAFKA_BOOTSTRAP=bootstrap,
        TOKENRELAY_TOPIC_PREFIX=settings.topic_prefix,
        TOKENRELAY_GATEWAY_PORT=str(port),
        TOKENRELAY_SUBSCRIBER_BUFFER="4096",
        TOKENRELAY_LOG_LEVEL="WARNING",
    )
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.main"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    results: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        # 1. fan-out throughput: one request, FANOUT_CLIENTS subscribers, events published as fast as possible
        rid = new_request_id()
        clients = _spawn_clients(f"{base}/v1/requests/{rid}/events", FANOUT_CLIENTS)
        asyncio.run(_publish(settings, rid, FANOUT_EVENTS))
        r = _result(clients)
        rate = r["count"] / max(1e-6, r["last"] - r["first"])
        results["gateway_events_per_s"] = rate
        print(f"fan-out: {r['count']} events to {FANOUT_CLIENTS} clients: {rate:,.0f} events/s", flush=True)

        # 2. hop latency at half that rate
        rid = new_request_id()
        per_request_rate = rate / 2 / FANOUT_CLIENTS
        n = max(20, int(per_request_rate * 10))
        clients = _spawn_clients(f"{base}/v1/requests/{rid}/events", FANOUT_CLIENTS)
        asyncio.run(_publish(settings, rid, n, rate=per_request_rate))
        lat = _result(clients)["latencies"]
        results["hop_latency_ms_p50"] = statistics.median(lat)
        results["hop_latency_ms_p99"] = _pct(lat, 0.99)
        print(
            f"produce-to-deliver at {rate / 2:,.0f} events/s: p50 {results['hop_latency_ms_p50']:.1f} ms, "
            f"p99 {results['hop_latency_ms_p99']:.1f} ms",
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
        results["resume_ms_p99_memory"] = _pct(mem, 0.99)
        results["resume_ms_p50_kafka"] = statistics.median(kafka)
        results["resume_ms_p99_kafka"] = _pct(kafka, 0.99)
        print(
            f"resume first event: memory p50 {statistics.median(mem):.1f} / p99 {_pct(mem, 0.99):.1f} ms; "
            f"kafka p50 {statistics.median(kafka):.1f} / p99 {_pct(kafka, 0.99):.1f} ms",
            flush=True,
        )

        # 4. memory per idle connection
        gw_proc = psutil.Process(gateway.pid)
        before = gw_proc.memory_info().rss
        rid = new_request_id()
        clients = _spawn_clients(f"{base}/v1/requests/{rid}/events", IDLE_CONNECTIONS, idle=True)
        time.sleep(2)
        after = gw_proc.memory_info().rss
        assert clients.stdin is not None
        clients.stdin.write("\n")
        clients.stdin.flush()
        clients.communicate(timeout=120)
        results["idle_conn_kb"] = (after - before) / IDLE_CONNECTIONS / 1024
        print(f"idle connections: {IDLE_CONNECTIONS}: {results['idle_conn_kb']:.1f} KB each (gateway RSS delta)")
    finally:
        gateway.terminate()
        gateway.wait(30)
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        _client_main(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "idle")
    else:
        print(json.dumps(run(), indent=2))

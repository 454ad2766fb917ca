"""Pipeline benchmark (synthetic engine): Kafka + gateway overhead vs in-process SSE, and slow-subscriber impact."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from bench.support import (
    ROOT,
    ClientResult,
    StreamSpec,
    bench_settings,
    bootstrap_from_env,
    gateway_metric,
    gather_results,
    load,
    marks_latency_ms,
    pct,
    raise_fd_limit,
    running,
    spawn_clients,
    start_gateway,
    start_worker,
    stop_process,
    submit,
)
from gateway.fanout.cursor import Cursor, encode_cursor
from gateway.fanout.sse import PREAMBLE, frame
from schemas.ids import new_request_id
from schemas.sampling import SamplingParams
from workers.engine.types import EngineRequest
from workers.synthetic import SyntheticEngine

STREAMS = int(os.environ.get("BENCH_PIPELINE_STREAMS", "256"))
RATE = float(os.environ.get("BENCH_PIPELINE_RATE", "100"))  # tokens/s per stream
TOKENS = int(os.environ.get("BENCH_PIPELINE_TOKENS", "1500"))  # per stream
ROUNDS = int(os.environ.get("BENCH_PIPELINE_ROUNDS", "1"))
CLIENT_PROCESSES = int(os.environ.get("BENCH_PIPELINE_CLIENT_PROCESSES", "2"))
SLOW_REQUESTS = int(os.environ.get("BENCH_SLOW_REQUESTS", "20"))
SLOW_SUBSCRIBERS = 4  # per request
SLOW_SHARE = 0.05
SLOW_RATE = float(os.environ.get("BENCH_SLOW_RATE", "100"))
SLOW_TOKENS = int(os.environ.get("BENCH_SLOW_TOKENS", "2000"))
# The slow-subscriber runs use their own gateway with small buffers, so that a slow subscriber fills them within a
# stream and is dropped: with the defaults (1,024 events and a kernel send buffer autotuned to ~4 MB per connection)
# a 2,000-event stream fits in the buffers and the drop path is never taken.
SLOW_SUBSCRIBER_BUFFER = int(os.environ.get("BENCH_SLOW_SUBSCRIBER_BUFFER", "64"))
SLOW_SEND_BUFFER = int(os.environ.get("BENCH_SLOW_SEND_BUFFER", "32768"))


# --- the in-process baseline: the same synthetic engine writing SSE straight to its clients, no Kafka --------------


class InProcess:
    """A tiny aiohttp app: POST /start adds requests to a SyntheticEngine; its tokens go straight to SSE streams."""

    def __init__(self, rate: float, max_batch: int):
        self.engine = SyntheticEngine(rate, max_batch)
        self.queues: dict[str, asyncio.Queue[bytes | None]] = {}
        self.offset = 0
        self.seq: dict[str, int] = {}
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1)

    async def events(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["rid"]
        queue = self.queues.setdefault(rid, asyncio.Queue())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        await response.write(PREAMBLE)
        while True:
            item = await queue.get()
            batch = [item]
            while item is not None and not queue.empty():
                item = queue.get_nowait()
                batch.append(item)
            await response.write(b"".join(b for b in batch if b is not None))
            if batch[-1] is None:
                return response

    async def start(self, request: web.Request) -> web.Response:
        body = await request.json()
        for rid in body["ids"]:
            self.queues.setdefault(rid, asyncio.Queue())
            self.seq[rid] = 0
            self.engine.add(EngineRequest(rid, [1], SamplingParams(max_tokens=int(body["max_tokens"]))))
        self.wake.set()
        return web.json_response({"started": len(body["ids"])})

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work():
                self.wake.clear()
                await self.wake.wait()
                continue
            for out in await loop.run_in_executor(self.executor, self.engine.step):
                queue = self.queues[out.request_id]
                self.offset += 1
                self.seq[out.request_id] += 1
                cursor = encode_cursor(Cursor(0, 0, self.offset))
                if out.token_ids:
                    data = {"seq": self.seq[out.request_id], "text": out.text, "token_ids": list(out.token_ids)}
                    queue.put_nowait(frame("token", json.dumps(data, separators=(",", ":")), cursor))
                if out.finish_reason is not None:
                    usage = {"prompt_tokens": 1, "completion_tokens": self.seq[out.request_id]}
                    done = {"finish_reason": out.finish_reason, "usage": usage}
                    queue.put_nowait(frame("done", json.dumps(done), cursor))
                    queue.put_nowait(None)


async def _serve_inprocess(port: int, rate: float, max_batch: int) -> None:
    app_state = InProcess(rate, max_batch)
    app = web.Application()
    app.router.add_get("/v1/requests/{rid}/events", app_state.events)
    app.router.add_post("/start", app_state.start)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    task = asyncio.create_task(app_state.loop())
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    task.cancel()
    await runner.cleanup()


def _start_inprocess(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_pipeline", "--inprocess", str(port), str(RATE), str(STREAMS)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        raise RuntimeError("in-process server failed to start")
    return proc


def _post(url: str, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass


# --- runs ----------------------------------------------------------------------------------------------------------


def _inprocess_run(port: int) -> ClientResult:
    ids = [new_request_id() for _ in range(STREAMS)]
    specs = [StreamSpec(f"http://127.0.0.1:{port}/v1/requests/{rid}/events") for rid in ids]
    clients = spawn_clients(specs, CLIENT_PROCESSES)
    _post(f"http://127.0.0.1:{port}/start", {"ids": ids, "max_tokens": TOKENS})
    return gather_results(clients)


def _pipeline_run(
    settings: Any,
    base: str,
    n: int,
    tokens: int,
    *,
    per: int = 1,
    slow: int = 0,
    sample_every: int = 0,
    deadline_s: float = 600.0,
) -> ClientResult:
    """n requests through worker and gateway, `per` subscribers each, `slow` of them slow subscribers."""
    ids = [new_request_id() for _ in range(n)]
    specs = [StreamSpec(f"{base}/v1/requests/{rid}/events", "read", sample_every) for rid in ids for _ in range(per)]
    # The slow subscribers: one on each of `slow` different requests, alternately not reading at all and trickling.
    for k in range(slow):
        i = (k * len(ids) // max(1, slow)) * per
        specs[i] = StreamSpec(specs[i].url, "stop" if k % 2 == 0 else "slow")
    clients = spawn_clients(
        specs, CLIENT_PROCESSES, latency="cursor" if sample_every else "none", deadline_s=deadline_s
    )
    asyncio.run(submit(settings, ids, tokens))
    return gather_results(clients)


def _warm_up(settings: Any, base: str, worker: subprocess.Popen[bytes]) -> None:
    """One short request end to end: the worker has joined its group and the gateway's hub is reading."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        result = _pipeline_run(settings, base, 1, 5, deadline_s=10)
        if result.done == 1:
            return
    raise RuntimeError("the pipeline did not answer a warm-up request")


def run() -> dict[str, float]:
    raise_fd_limit()
    settings = bench_settings(bootstrap_from_env())
    base = f"http://127.0.0.1:{settings.gateway_port}"
    results: dict[str, float] = {}
    print(f"synthetic engine: {STREAMS} streams x {TOKENS} tokens at {RATE:g} tokens/s each; {load()}", flush=True)
    from services.local.broker.runner import free_port

    inproc_port = free_port()
    inproc = _start_inprocess(inproc_port)
    gateway = start_gateway(settings)
    slow_gateway: subprocess.Popen[bytes] | None = None
    worker = start_worker(
        settings,
        TOKENRELAY_ENGINE="synthetic",
        TOKENRELAY_SYNTHETIC_TOKENS_PER_S=str(RATE),
        TOKENRELAY_MAX_BATCH_SIZE=str(max(STREAMS, SLOW_REQUESTS)),
        TOKENRELAY_MAX_TOKENS_LIMIT=str(max(TOKENS, SLOW_TOKENS)),
    )
    try:
        with running(gateway, worker):
            _warm_up(settings, base, worker)
            # 1. overhead ratio: the same clients, the same engine, alternately in-process and through the pipeline
            inproc_rates: list[float] = []
            pipe_rates: list[float] = []
            for _ in range(ROUNDS):
                r = _inprocess_run(inproc_port)
                inproc_rates.append(r.tokens_per_s)
                print(
                    f"  in-process (synthetic engine, no Kafka): {r.tokens:,} tokens, {r.tokens_per_s:,.0f} tokens/s, "
                    f"{r.done}/{STREAMS} complete; {load()}",
                    flush=True,
                )
                r = _pipeline_run(settings, base, STREAMS, TOKENS)
                pipe_rates.append(r.tokens_per_s)
                print(
                    f"  pipeline (synthetic engine -> Kafka -> gateway): {r.tokens:,} tokens, "
                    f"{r.tokens_per_s:,.0f} tokens/s, {r.events:,} events, {r.done}/{STREAMS} complete; {load()}",
                    flush=True,
                )
            results["inprocess_tokens_per_s"] = sum(inproc_rates) / len(inproc_rates)
            results["pipeline_tokens_per_s"] = sum(pipe_rates) / len(pipe_rates)
            results["pipeline_overhead_ratio"] = results["pipeline_tokens_per_s"] / results["inprocess_tokens_per_s"]
            print(
                f"synthetic engine: pipeline_overhead_ratio {results['pipeline_overhead_ratio']:.3f} "
                f"({results['pipeline_tokens_per_s']:,.0f} / {results['inprocess_tokens_per_s']:,.0f} tokens/s)",
                flush=True,
            )

            # 2. slow subscribers: others' delivery latency (event ts_ms at produce -> receipt) without and with 5%,
            # on a gateway whose buffers are small enough that the slow ones are actually dropped mid-stream.
            stop_process(gateway)
            slow_settings = dataclasses.replace(
                settings, subscriber_buffer=SLOW_SUBSCRIBER_BUFFER, sse_send_buffer=SLOW_SEND_BUFFER
            )
            slow_gateway = start_gateway(slow_settings)
            _warm_up(settings, base, worker)
            n_subs = SLOW_REQUESTS * SLOW_SUBSCRIBERS
            n_slow = max(1, round(n_subs * SLOW_SHARE))
            print(
                f"slow subscribers (synthetic engine, {SLOW_RATE:g} tokens/s): {SLOW_REQUESTS} requests x "
                f"{SLOW_SUBSCRIBERS} subscribers x {SLOW_TOKENS} tokens; {n_slow} slow in the second run; gateway "
                f"subscriber buffer {SLOW_SUBSCRIBER_BUFFER} events, socket send buffer {SLOW_SEND_BUFFER} B",
                flush=True,
            )
            p99s = []
            for slow in (0, n_slow):
                before = gateway_metric(settings.gateway_port, "tokenrelay_gateway_slow_subscriber_disconnects_total")
                r = _pipeline_run(
                    settings, base, SLOW_REQUESTS, SLOW_TOKENS, per=SLOW_SUBSCRIBERS, slow=slow, sample_every=2
                )
                dropped = (
                    gateway_metric(settings.gateway_port, "tokenrelay_gateway_slow_subscriber_disconnects_total")
                    - before
                )
                lat = asyncio.run(marks_latency_ms(settings, r.marks))
                p99s.append(pct(lat, 0.99))
                print(
                    f"  {slow} slow: others' latency p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms "
                    f"({len(lat):,} samples, {r.done}/{n_subs - slow} complete, {dropped:.0f} slow disconnected); "
                    f"{load()}",
                    flush=True,
                )
            results["slow_client_p99_ms_without"] = p99s[0]
            results["slow_client_p99_ms_with"] = p99s[1]
            results["slow_client_p99_ratio"] = p99s[1] / p99s[0]
            results["slow_disconnects"] = dropped
            print(
                f"slow_client_p99_ratio {results['slow_client_p99_ratio']:.2f} "
                f"({dropped:.0f} of {n_slow} slow subscribers disconnected)",
                flush=True,
            )
    finally:
        stop_process(slow_gateway)
        assert inproc.stdin is not None
        inproc.stdin.write("\n")
        inproc.stdin.flush()
        try:
            inproc.wait(10)
        except subprocess.TimeoutExpired:
            inproc.kill()
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--inprocess":
        asyncio.run(_serve_inprocess(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
    else:
        print(json.dumps(run(), indent=2))

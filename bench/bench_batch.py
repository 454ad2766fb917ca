"""Batch API throughput: the same completions as one batch vs one by one over HTTP (and 32 in flight).

One stack (gateway and one worker with the built-in model), interleaved rounds. Per round and side: wall time from
the first byte sent to the last answer in hand (for the batch: upload, create, poll every 0.2 s, download the output
file). Ratios are HTTP time / batch time, so above 1.0 the batch is faster. Needs a broker (`python -m bench` starts
one; or TOKENRELAY_KAFKA_BOOTSTRAP).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from bench.support import bench_settings, bootstrap_from_env, load, pct, running, start_gateway, start_worker
from services.cli.batch import TERMINAL, BatchClient

POLL_S = 0.2


def lines(n: int, max_tokens: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": "default",
                "prompt": f"The story of {tag} number {i}:",
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        for i in range(n)
    ]


async def as_batch(url: str, requests: list[dict[str, Any]]) -> tuple[float, int]:
    """Seconds from upload to output file in hand, and the output tokens."""
    data = "".join(json.dumps(line) + "\n" for line in requests).encode()
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        client = BatchClient(session, url, None)
        uploaded = await client.upload("bench.jsonl", data)
        batch = await client.create(uploaded["id"], "/v1/completions")
        while batch["status"] not in TERMINAL:
            await asyncio.sleep(POLL_S)
            batch = await client.retrieve(batch["id"])
        if batch["status"] != "completed":
            raise RuntimeError(f"batch ended {batch['status']}: {batch}")
        output = await client.content(batch["output_file_id"])
    elapsed = time.perf_counter() - started
    answers = [json.loads(line) for line in output.splitlines()]
    assert len(answers) == len(requests)
    return elapsed, sum(a["response"]["body"]["usage"]["completion_tokens"] for a in answers)


async def over_http(url: str, requests: list[dict[str, Any]], concurrency: int) -> tuple[float, int]:
    """Seconds to send every request over HTTP with ``concurrency`` in flight (1: one by one), and the tokens."""
    tokens = 0
    queue = list(requests)
    started = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while queue:
            line = queue.pop()
            async with session.post(url + line["url"], json=line["body"]) as response:
                body = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {body}")
                tokens += body["usage"]["completion_tokens"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return time.perf_counter() - started, tokens


def run(requests: int = 500, max_tokens: int = 64, rounds: int = 3, concurrency: int = 32) -> dict[str, float]:
    settings = bench_settings(bootstrap_from_env(), max_batch_size=concurrency)
    worker = start_worker(settings, TOKENRELAY_ENGINE="model")
    gateway = start_gateway(settings)
    url = f"http://127.0.0.1:{settings.gateway_port}"
    times: dict[str, list[float]] = {"batch": [], "sequential": [], "concurrent": []}
    with running(gateway, worker):
        asyncio.run(_warm_up(url))
        print(f"{requests} completions x {max_tokens} tokens at most, built-in model, {rounds} rounds; {load()}")
        for r in range(rounds):
            # Interleaved, and a different order each round, so a drift in machine load hits every side alike.
            order = ["batch", "sequential", "concurrent"]
            order = order[r % 3 :] + order[: r % 3]
            for side in order:
                batch = lines(requests, max_tokens, f"r{r}{side}")
                if side == "batch":
                    elapsed, tokens = asyncio.run(as_batch(url, batch))
                else:
                    elapsed, tokens = asyncio.run(over_http(url, batch, 1 if side == "sequential" else concurrency))
                times[side].append(elapsed)
                print(f"  round {r + 1} {side:>10}: {elapsed:6.1f} s, {tokens / elapsed:7.0f} tokens/s")
    out: dict[str, float] = {}
    for side in ("sequential", "concurrent"):
        ratios = [http / batch for http, batch in zip(times[side], times["batch"], strict=True)]
        name = f"batch_vs_{side}_http_ratio"
        out[f"{name}_min"], out[f"{name}_median"], out[f"{name}_max"] = (
            min(ratios),
            statistics.median(ratios),
            max(ratios),
        )
        print(
            f"{side} HTTP time / batch time: median {out[f'{name}_median']:.2f} "
            f"(min {out[f'{name}_min']:.2f}, max {out[f'{name}_max']:.2f})"
        )
    out["batch_requests_per_s_median"] = requests / statistics.median(times["batch"])
    return out


async def ttft_ms(session: aiohttp.ClientSession, url: str) -> float:
    """Time to the first content chunk of one streaming interactive chat request."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Are you there?"}],
        "max_tokens": 8,
        "stream": True,
    }
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        async for raw in response.content:
            if raw.startswith(b"data: {") and b'"content"' in raw and b'"content":""' not in raw.replace(b" ", b""):
                elapsed = (time.perf_counter() - started) * 1000
                await response.read()
                return elapsed
    raise RuntimeError("the stream ended without content")


async def _ttft_under_batch(url: str, lines_n: int, max_tokens: int, probes: int) -> tuple[list[float], list[float]]:
    """Interactive TTFTs on the idle stack, then while a batch of ``lines_n`` lines runs (one probe every 0.5 s)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        idle = [await ttft_ms(session, url) for _ in range(probes)]
        batch = asyncio.create_task(as_batch(url, lines(lines_n, max_tokens, "flood")))
        probing: list[asyncio.Task[float]] = []
        await asyncio.sleep(2.0)  # the batch is submitted and running
        while not batch.done():  # a probe every 0.5 s, each on its own: a slow one does not delay the next
            probing.append(asyncio.create_task(ttft_ms(session, url)))
            await asyncio.sleep(0.5)
        await batch
        busy = list(await asyncio.gather(*probing))
    return idle, busy


def run_ttft(lines_n: int = 10_000, max_tokens: int = 64, probes: int = 10) -> dict[str, float]:
    """Interactive TTFT while a batch runs: the fair-service goal, through the Batch API."""
    settings = bench_settings(bootstrap_from_env())
    worker = start_worker(settings, TOKENRELAY_ENGINE="model")
    gateway = start_gateway(settings)
    url = f"http://127.0.0.1:{settings.gateway_port}"
    with running(gateway, worker):
        asyncio.run(_warm_up(url))
        idle, busy = asyncio.run(_ttft_under_batch(url, lines_n, max_tokens, probes))
    out = {
        "batch_interactive_ttft_ms_p50_idle": statistics.median(idle),
        "batch_interactive_ttft_ms_p99_idle": pct(idle, 0.99),
        "batch_interactive_ttft_ms_p50_busy": statistics.median(busy),
        "batch_interactive_ttft_ms_p99_busy": pct(busy, 0.99),
    }
    print(
        f"interactive TTFT, idle: p50 {out['batch_interactive_ttft_ms_p50_idle']:.0f} ms, "
        f"p99 {out['batch_interactive_ttft_ms_p99_idle']:.0f} ms ({len(idle)} probes); while a {lines_n}-line batch "
        f"runs: p50 {out['batch_interactive_ttft_ms_p50_busy']:.0f} ms, "
        f"p99 {out['batch_interactive_ttft_ms_p99_busy']:.0f} ms ({len(busy)} probes); {load()}"
    )
    return out


async def _warm_up(url: str, timeout_s: float = 180.0) -> None:
    """Until the worker answers: the model is loaded and announced."""
    deadline = time.monotonic() + timeout_s
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker answered within {timeout_s:.0f} s")
            await asyncio.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight, and the worker's batch")
    parser.add_argument(
        "--ttft", type=int, metavar="LINES", help="instead: interactive TTFT while a batch of LINES lines runs"
    )
    args = parser.parse_args()
    if args.ttft:
        print(json.dumps(run_ttft(args.ttft, args.max_tokens)))
        return
    print(json.dumps(run(args.requests, args.max_tokens, args.rounds, args.concurrency)))


if __name__ == "__main__":
    main()

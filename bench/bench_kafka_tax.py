"""The Kafka tax: tokenrelay's stack with the vLLM engine (gateway -> Kafka -> worker running vLLM's AsyncLLM) against
vLLM's own OpenAI server on the same model, and the built-in engine against the vLLM engine inside the same stack.

32 OpenAI streaming chat clients per round (the official SDK), greedy, 64 tokens at most, rounds interleaved with the
order rotated. Same engine settings on both vLLM sides: prefix caching on, 32 sequences, fp32 on CPU, the same KV
budget. Goals: stack-with-vLLM / vLLM serve tokens/s >= 0.95, and its TTFT p50 within vLLM's + 30 ms.
``--cuda`` runs the same A/B on a GPU (vLLM from this venv, `pip install 'tokenrelay[vllm]'`; both vLLM instances
share the GPU, so each gets --gpu-share of its memory). Needs the vLLM venv on CPU (`make vllm-venv`) and a broker
(`python -m bench` starts one).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.bench_serve import _round, _warm_up, start_vllm
from bench.bench_vllm import bench_model, peer_python
from bench.support import (
    bench_settings,
    bootstrap_from_env,
    load,
    running,
    start_gateway,
    start_worker,
    stop_process,
    wait_idle,
)
from services.local.broker.runner import free_port

KV_CACHE_MB = 1024
METRICS = ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")


def _vllm_python(cuda: bool) -> Path | None:
    if cuda:
        probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, check=False)
        return Path(sys.executable) if probe.returncode == 0 else None
    python = peer_python()
    return python if python.is_file() else None


def _summary(label: str, a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> dict[str, float]:
    out: dict[str, float] = {}
    print(f"  {label}:")
    for metric in METRICS:
        ratios = [x[metric] / y[metric] for x, y in zip(a, b, strict=True)]
        ma, mb = statistics.median(x[metric] for x in a), statistics.median(y[metric] for y in b)
        out[f"{key}_{metric}_min"], out[f"{key}_{metric}_median"], out[f"{key}_{metric}_max"] = (
            min(ratios),
            statistics.median(ratios),
            max(ratios),
        )
        print(
            f"    {metric:13s} {ma:8.1f} vs {mb:8.1f}   ratio min/median/max "
            f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}",
            flush=True,
        )
    return out


def run(
    size: str = "25m",
    clients: int = 32,
    max_tokens: int = 64,
    rounds: int = 3,
    cuda: bool = False,
    gpu_share: float = 0.4,
) -> dict[str, float]:
    python = _vllm_python(cuda)
    if python is None:
        where = "this venv (pip install 'tokenrelay[vllm]')" if cuda else f"{peer_python()} (make vllm-venv)"
        print(f"skipped: vLLM not found in {where}", flush=True)
        return {}
    model = bench_model(size)
    ours, builtin = f"tax-vllm-{size}", f"tax-builtin-{size}"
    engine_env: dict[str, str] = {"TOKENRELAY_MAX_BATCH_SIZE": "32"}
    if cuda:
        memory = ("--gpu-memory-utilization", str(gpu_share))
        engine_env |= {"TOKENRELAY_VLLM_GPU_MEMORY_UTILIZATION": str(gpu_share), "TOKENRELAY_DEVICE": "cuda"}
        dtype = "auto"
    else:
        memory = ("--kv-cache-memory-bytes", str(KV_CACHE_MB << 20))
        engine_env |= {"TOKENRELAY_KV_CACHE_MB": str(KV_CACHE_MB), "TOKENRELAY_DEVICE": "cpu"}
        dtype = "float32"
    settings = bench_settings(bootstrap_from_env(), max_batch_size=32)
    vllm_port = free_port()
    vllm_worker = start_worker(settings, str(python), TOKENRELAY_MODEL=f"{ours}=vllm:{model}", **engine_env)
    builtin_worker = start_worker(settings, TOKENRELAY_MODEL=f"{builtin}=model:{model}", **engine_env)
    vllm = start_vllm(python, model, ours, vllm_port, prefix_caching=True, memory=memory, dtype=dtype)
    gateway = None
    stack_base, vllm_base = f"http://127.0.0.1:{settings.gateway_port}", f"http://127.0.0.1:{vllm_port}"
    sides: dict[str, list[dict[str, float]]] = {"stack_vllm": [], "vllm_serve": [], "stack_builtin": []}
    plan: list[tuple[str, str, str, subprocess.Popen[Any]]] = [
        ("stack_vllm", stack_base, ours, vllm_worker),
        ("vllm_serve", vllm_base, ours, vllm),
        ("stack_builtin", stack_base, builtin, builtin_worker),
    ]
    try:
        gateway = start_gateway(settings, timeout_s=600)
        for _, base, name, proc in plan:
            _warm_up(base, name, 1200, proc)
        for r in range(rounds):
            for side, base, name, proc in plan[r % 3 :] + plan[: r % 3]:
                sides[side].append(asyncio.run(_round(base, name, clients, max_tokens)))
                wait_idle(proc.pid)
    finally:
        with running(*(p for p in (gateway, vllm_worker, builtin_worker) if p is not None)):
            stop_process(vllm, 60)
    where = "CUDA" if cuda else "CPU"
    print(f"Kafka tax on {where}, {clients} streaming chat clients, {size} model, {rounds} rounds ({load()}):")
    results = _summary(
        "stack with the vLLM engine vs vLLM serve", sides["stack_vllm"], sides["vllm_serve"], "kafka_tax"
    )
    ttft_gap = [
        a["ttft_ms_p50"] - b["ttft_ms_p50"] for a, b in zip(sides["stack_vllm"], sides["vllm_serve"], strict=True)
    ]
    results["kafka_tax_ttft_p50_gap_ms_median"] = statistics.median(ttft_gap)
    print(
        f"    TTFT p50 gap (stack - vLLM) ms min/median/max {min(ttft_gap):.0f} / {statistics.median(ttft_gap):.0f}"
        f" / {max(ttft_gap):.0f}"
    )
    results |= _summary(
        "built-in engine vs vLLM engine, both in the stack",
        sides["stack_builtin"],
        sides["stack_vllm"],
        "engine_builtin_vs_vllm",
    )
    return {f"{k}_{where.lower()}": v for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="25m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cuda", action="store_true", help="run on a GPU (vLLM installed in this venv)")
    parser.add_argument("--gpu-share", type=float, default=0.4, help="GPU memory fraction of each vLLM instance")
    args = parser.parse_args()
    run(args.size, args.clients, args.max_tokens, args.rounds, args.cuda, args.gpu_share)


if __name__ == "__main__":
    main()

"""Peak RSS and step times of the engine at 32 concurrent requests x 1,024 tokens on the ~120M random Llama.

Each request has a 960-token prompt and generates 64 tokens (EOS ignored). Prints the process's high-water RSS, the
KV cache's size, TTFT, and engine step times with and without a prefill chunk in them: chunked prefill bounds how
long any step -- and so any running stream -- waits behind prompts.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

import psutil


def run(size: str = "120m", concurrent: int = 32, prompt_tokens: int = 960, max_tokens: int = 64) -> dict[str, float]:
    from bench.bench_vllm import bench_model
    from schemas.sampling import SamplingParams
    from workers.engine.engine import Engine
    from workers.engine.types import EngineRequest

    engine = Engine.load(str(bench_model(size)), device="cpu", max_batch_size=concurrent)
    engine.eos_ids = frozenset()
    idle_mib = psutil.Process().memory_info().rss / 2**20
    base = engine.encode_prompt("Kafka stores records in partitions, and every partition is an ordered log. " * 80)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    for i in range(concurrent):
        engine.add(EngineRequest(f"m{i}", [i % 100 + 3, *base[: prompt_tokens - 1]], params))
    first: dict[str, float] = {}
    steps: list[float] = []
    prefill_steps: list[float] = []
    prefill = engine.runner.prefill
    chunked: list[int] = []

    def counting_prefill(row_ids: Any, chunks: Any, want: Any) -> Any:
        chunked.append(len(chunks) * max(len(c) for c in chunks))
        return prefill(row_ids, chunks, want)

    engine.runner.prefill = counting_prefill  # type: ignore[method-assign]
    while engine.has_work():
        chunked.clear()
        t0 = time.perf_counter()
        outputs = engine.step()
        (prefill_steps if chunked else steps).append(time.perf_counter() - t0)
        for out in outputs:
            if out.token_ids:
                first.setdefault(out.request_id, time.perf_counter() - start)
    total = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ttft = sorted(first.values())
    results = {
        f"engine_peak_rss_mib_{size}_{concurrent}x{prompt_tokens + max_tokens}": peak_mib,
        f"engine_idle_rss_mib_{size}": idle_mib,
        f"engine_kv_cache_mib_{size}_{concurrent}x{prompt_tokens + max_tokens}": engine.runner.cache.nbytes / 2**20,
        f"engine_ttft_s_p50_{size}_{concurrent}x{prompt_tokens}": statistics.median(ttft),
        f"engine_ttft_s_max_{size}_{concurrent}x{prompt_tokens}": ttft[-1],
        f"engine_prefill_step_ms_max_{size}": max(prefill_steps) * 1000,
        f"engine_prefill_step_ms_p50_{size}": statistics.median(prefill_steps) * 1000,
        f"engine_decode_step_ms_max_{size}": max(steps) * 1000,
        f"engine_decode_step_ms_p50_{size}": statistics.median(steps) * 1000,
        f"engine_total_s_{size}_{concurrent}x{prompt_tokens + max_tokens}": total,
    }
    for key, value in results.items():
        print(f"{key}: {value:,.1f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="120m")
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=960)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    run(args.size, args.concurrent, args.prompt_tokens, args.max_tokens)


if __name__ == "__main__":
    main()

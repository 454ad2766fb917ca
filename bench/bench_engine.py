"""Output tokens/s of continuous batching at 1, 8 and 32 concurrent requests vs sequential generate(), and TTFT."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from schemas.sampling import SamplingParams
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest
from workers.model.registry import resolve_model

PROMPTS = [
    "The history of the printing press",
    "Once upon a time, in a small village",
    "Kafka stores records in partitions",
    "Write a short note about rivers",
]


def _requests(engine: Engine, n: int, max_tokens: int, tag: str) -> list[EngineRequest]:
    return [
        EngineRequest(
            f"{tag}-{i}", engine.encode_prompt(PROMPTS[i % len(PROMPTS)] + f" ({i})"), SamplingParams(max_tokens, 0.0)
        )
        for i in range(n)
    ]


def _continuous(engine: Engine, n: int, max_tokens: int) -> tuple[float, list[float]]:
    """All ``n`` requests arrive at once; returns output tokens/s and each request's TTFT in ms."""
    requests = _requests(engine, n, max_tokens, f"cb{n}")
    start = time.perf_counter()
    for r in requests:
        engine.add(r)
    first: dict[str, float] = {}
    tokens = 0
    while engine.has_work():
        for out in engine.step():
            if out.token_ids:
                tokens += len(out.token_ids)
                first.setdefault(out.request_id, (time.perf_counter() - start) * 1000)
    return tokens / (time.perf_counter() - start), list(first.values())


def _sequential_generate(engine: Engine, reference: Any, n: int, max_tokens: int) -> float:
    tokens = 0
    start = time.perf_counter()
    for r in _requests(engine, n, max_tokens, "gen"):
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([r.prompt_ids], device=engine.device),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
            )
        tokens += out.shape[1] - len(r.prompt_ids)
    return tokens / (time.perf_counter() - start)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(model: str = "default", max_tokens: int = 64) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    engine = Engine.load(path, max_batch_size=32)
    # generate() runs on its own copy: the engine's model attends through the engine's cache only.
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    reference.to(engine.device)
    # Fixed-length generations on both sides (vLLM's benchmarks call it ignore_eos): otherwise a model that
    # ends its answers early turns the comparison into one of prefill costs.
    engine.eos_ids = frozenset()
    _continuous(engine, 2, 4)  # warm-up
    results: dict[str, float] = {"generate_tokens_per_s": _sequential_generate(engine, reference, 4, max_tokens)}
    for n in (1, 8, 32):
        tps, ttft = _continuous(engine, n, max_tokens)
        results[f"cb_tokens_per_s_{n}"] = tps
        results[f"cb_speedup_{n}"] = tps / results["generate_tokens_per_s"]
        results[f"ttft_ms_p50_{n}"] = statistics.median(ttft)
        results[f"ttft_ms_p99_{n}"] = _pct(ttft, 0.99)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    r = run(args.model, args.max_tokens)
    print(f"sequential generate(): {r['generate_tokens_per_s']:8.1f} tokens/s")
    for n in (1, 8, 32):
        print(
            f"continuous batching, {n:2d} concurrent: {r[f'cb_tokens_per_s_{n}']:8.1f} tokens/s"
            f"  ({r[f'cb_speedup_{n}']:.2f}x generate)  TTFT p50 {r[f'ttft_ms_p50_{n}']:.1f} ms"
            f"  p99 {r[f'ttft_ms_p99_{n}']:.1f} ms"
        )


if __name__ == "__main__":
    main()

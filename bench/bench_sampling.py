"""Cost of the OpenAI sampling options in the built-in engine: 32 concurrent requests on the default model, plain
greedy vs penalties + logit_bias + logprobs (top 5), interleaved A/B rounds; and n=4 choices vs 4 requests."""

from __future__ import annotations

import argparse
import statistics
import time

from schemas.sampling import SamplingParams
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest
from workers.model.registry import resolve_model

PROMPT = "Kafka stores records in partitions and the worker reads"
OPTIONS = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "logit_bias": {"5": -2.0, "7": 1.5},
    "logprobs": True,
    "top_logprobs": 5,
}


def _tokens_per_s(engine: Engine, params: SamplingParams, count: int, tag: str) -> float:
    prompt = engine.encode_prompt(PROMPT)
    start = time.perf_counter()
    for i in range(count):
        engine.add(EngineRequest(f"{tag}-{i}", prompt, params))
    tokens = 0
    while engine.has_work():
        tokens += sum(len(out.token_ids) for out in engine.step())  # every choice's tokens
    return tokens / (time.perf_counter() - start)


def run(rounds: int = 5, concurrent: int = 32, max_tokens: int = 48) -> dict[str, float]:
    engine = Engine.load(resolve_model("default"), device="cpu", max_batch_size=concurrent)
    engine.eos_ids = frozenset()  # every request generates max_tokens: equal work on both sides
    plain = SamplingParams(max_tokens, 0.0)
    options = SamplingParams(max_tokens, 0.0, **OPTIONS)  # type: ignore[arg-type]
    _tokens_per_s(engine, plain, concurrent, "warm")
    ratios, plain_rates, option_rates = [], [], []
    for r in range(rounds):  # interleaved, so drift on a shared machine hits both sides alike
        a = _tokens_per_s(engine, plain, concurrent, f"a{r}")
        b = _tokens_per_s(engine, options, concurrent, f"b{r}")
        plain_rates.append(a)
        option_rates.append(b)
        ratios.append(b / a)
    n_ratios = []
    for r in range(rounds):
        four = _tokens_per_s(engine, SamplingParams(max_tokens, 1.0, seed=r, n=4), concurrent // 4, f"n{r}")
        single = _tokens_per_s(engine, SamplingParams(max_tokens, 1.0, seed=r), concurrent, f"s{r}")
        n_ratios.append(four / single)
    print(f"plain greedy, {concurrent} concurrent: {statistics.median(plain_rates):,.0f} tokens/s (median)")
    print(f"with penalties, logit_bias, logprobs top 5: {statistics.median(option_rates):,.0f} tokens/s (median)")
    print(
        f"options / plain: min {min(ratios):.3f} median {statistics.median(ratios):.3f} max {max(ratios):.3f}",
    )
    print(
        f"{concurrent // 4} requests of n=4 / {concurrent} requests (tokens/s): min {min(n_ratios):.3f} "
        f"median {statistics.median(n_ratios):.3f} max {max(n_ratios):.3f}"
    )
    return {
        "sampling_options_ratio_32_median": statistics.median(ratios),
        "sampling_options_ratio_32_min": min(ratios),
        "sampling_n4_vs_4_requests_ratio_median": statistics.median(n_ratios),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    run(args.rounds)

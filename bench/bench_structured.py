"""Per-token cost of constrained decoding (a JSON schema, xgrammar masks) against free decoding on the built-in
engine at 32 concurrent requests: interleaved A/B rounds, min/median/max ms per generated token, and the ratio.

Free runs ignore the end-of-sequence token (every request generates ``--tokens``); constrained runs end where their
grammar does or at ``--tokens``; both are counted per generated token. Goal: constrained ≤ 1.10 x free.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from schemas.sampling import SamplingParams
from schemas.structured import Structured, parse_response_format
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest
from workers.model.registry import resolve_model

# Nested objects, enums, numbers, arrays and unbounded strings: the mask changes at every kind of token.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role", "address", "tags", "score"],
}
PROMPTS = ["Describe a user", "A record for Oslo", "Kafka partitions", "Write a short note about rivers"]


def _requests(engine: Engine, n: int, tokens: int, fmt: str | None, tag: str) -> list[EngineRequest]:
    params = Structured(fmt).apply(SamplingParams(tokens, temperature=1.0, seed=1))
    return [
        EngineRequest(f"{tag}-{i}", engine.encode_prompt(PROMPTS[i % len(PROMPTS)] + f" ({i})"), params)
        for i in range(n)
    ]


def _ms_per_token(engine: Engine, requests: list[EngineRequest]) -> tuple[float, int]:
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    tokens = sum(len(ids) for ids, _, _ in results.values())
    return elapsed * 1000 / tokens, tokens


def run(model: str = "default", concurrent: int = 32, tokens: int = 64, rounds: int = 5) -> dict[str, float]:
    engine = Engine.load(resolve_model(model), max_batch_size=concurrent)
    assert engine.grammars  # built with the model's end-of-sequence token, so grammars still end there
    engine.eos_ids = frozenset()  # free runs go to max_tokens
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}})
    _ms_per_token(engine, _requests(engine, concurrent, 8, fmt, "warm-c"))  # compiles the schema once
    _ms_per_token(engine, _requests(engine, concurrent, 8, None, "warm-f"))
    free: list[float] = []
    constrained: list[float] = []
    counts: list[int] = []
    for r in range(rounds):
        order = [(None, free), (fmt, constrained)]
        for f, out in order if r % 2 == 0 else order[::-1]:
            ms, n = _ms_per_token(engine, _requests(engine, concurrent, tokens, f, f"r{r}-{f is None}"))
            out.append(ms)
            if f is not None:
                counts.append(n)
    ratios = [c / f for c, f in zip(constrained, free, strict=True)]
    print(f"{concurrent} concurrent, up to {tokens} tokens each, {rounds} interleaved rounds (ms per generated token)")
    print(f"{'':<12} {'min':>7} {'median':>7} {'max':>7}")
    for name, values in (("free", free), ("constrained", constrained), ("ratio", ratios)):
        print(f"{name:<12} {min(values):>7.3f} {statistics.median(values):>7.3f} {max(values):>7.3f}")
    print(f"constrained tokens per round: {counts} (of {concurrent * tokens})")
    return {
        "structured_ms_per_token_free_median": statistics.median(free),
        "structured_ms_per_token_constrained_median": statistics.median(constrained),
        "structured_cost_ratio_median": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.concurrent, args.tokens, args.rounds)))


if __name__ == "__main__":
    main()

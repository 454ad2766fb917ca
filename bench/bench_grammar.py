"""Per-token cost of a JSON-schema token mask with xgrammar, llguidance and outlines-core on the built-in tokenizer.

Each library compiles one schema once, then walks the tokens of a valid document: per token it fills the
allowed-token bitmask and advances its matcher (what a constrained sampler pays per row and step). Libraries run
interleaved, ``--rounds`` times; the figures are min/median/max microseconds per token. A library that is not
installed is reported as such (``pip install xgrammar outlines-core`` next to the product's llguidance).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.model.registry import resolve_model

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "tags", "role", "address", "active", "score"],
    "additionalProperties": False,
}


def documents(n: int, seed: int = 0) -> list[str]:
    """``n`` valid documents of SCHEMA, compact (as a constrained model writes them) with varied values."""
    rng = random.Random(seed)
    words = ["kafka", "stream", "token", "river", "café", "partition", "log", "replay", "日本", "offset"]
    out = []
    for i in range(n):
        doc = {
            "name": " ".join(rng.choice(words) for _ in range(2)),
            "age": rng.randint(1, 99),
            "email": f"{rng.choice(words)}{i}@example.org",
            "tags": [rng.choice(words) for _ in range(rng.randint(0, 4))],
            "role": rng.choice(["admin", "user", "guest"]),
            "address": {"street": f"{rng.randint(1, 200)} {rng.choice(words)} road", "city": "Oslo", "zip": "0150"},
            "active": rng.random() < 0.5,
            "score": round(rng.random() * 100, 2),
        }
        out.append(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return out


Walk = Callable[[list[list[int]]], int]  # walks token sequences, returns tokens walked


def _llguidance(tokenizer: Any, vocab: int) -> tuple[Walk, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll_tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    llguidance.LLMatcher.validate_grammar(grammar, ll_tok)
    compile_ms = (time.perf_counter() - start) * 1000
    bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tok.vocab_size)

    def walk(seqs: list[list[int]]) -> int:
        n = 0
        for seq in seqs:
            matcher = llguidance.LLMatcher(ll_tok, grammar)
            for token in seq:
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
                if not matcher.consume_token(token):
                    raise AssertionError(f"llguidance refused a valid token: {matcher.get_error()}")
                n += 1
        return n

    return walk, compile_ms


def _xgrammar(tokenizer: Any, vocab: int) -> tuple[Walk, float]:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_ms = (time.perf_counter() - start) * 1000
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def walk(seqs: list[list[int]]) -> int:
        n = 0
        for seq in seqs:
            matcher = xgrammar.GrammarMatcher(compiled)
            for token in seq:
                matcher.fill_next_token_bitmask(bitmask, 0)
                if not matcher.accept_token(token):
                    raise AssertionError("xgrammar refused a valid token")
                n += 1
        return n

    return walk, compile_ms


def _outlines(tokenizer: Any, vocab: int) -> tuple[Walk, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    eos = int(tokenizer.eos_token_id)
    entries: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id == eos or token in tokenizer.all_special_tokens:
            continue
        entries.setdefault(bytes(byte_of[c] for c in token), []).append(token_id)
    vocabulary = Vocabulary(eos, entries)
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[\n ]?"), vocabulary)
    compile_ms = (time.perf_counter() - start) * 1000
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def walk(seqs: list[list[int]]) -> int:
        n = 0
        for seq in seqs:
            guide = Guide(index)
            for token in seq:
                guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
                guide.advance(token)
                n += 1
        return n

    return walk, compile_ms


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: which printable character stands for each byte in a byte-level BPE vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


LIBRARIES: dict[str, Callable[[Any, int], tuple[Walk, float]]] = {
    "llguidance": _llguidance,
    "xgrammar": _xgrammar,
    "outlines-core": _outlines,
}


def run(model: str = "default", rounds: int = 7, docs: int = 20) -> dict[str, float]:
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(1)
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    seqs = [tokenizer.encode(d, add_special_tokens=False) for d in documents(docs)]
    walks: dict[str, Walk] = {}
    results: dict[str, float] = {}
    for name, make in LIBRARIES.items():
        try:
            walks[name], results[f"grammar_compile_ms_{name}"] = make(tokenizer, vocab)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
    for walk in walks.values():
        walk(seqs[:2])  # warm caches (lazy per-state work) before timing
    per_token: dict[str, list[float]] = {name: [] for name in walks}
    order = list(walks)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            n = walks[name](seqs)
            per_token[name].append((time.perf_counter() - start) / n * 1e6)
    tokens = sum(len(s) for s in seqs)
    print(f"vocab {vocab}, {docs} documents, {tokens} tokens per round, {rounds} rounds interleaved, 1 thread")
    print(f"{'library':<14} {'compile ms':>10} {'us/token min':>13} {'median':>8} {'max':>8}")
    for name, values in per_token.items():
        results[f"grammar_us_per_token_{name}_median"] = statistics.median(values)
        print(
            f"{name:<14} {results[f'grammar_compile_ms_{name}']:>10.1f} {min(values):>13.1f} "
            f"{statistics.median(values):>8.1f} {max(values):>8.1f}"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--docs", type=int, default=20)
    args = parser.parse_args()
    run(args.model, args.rounds, args.docs)


if __name__ == "__main__":
    main()

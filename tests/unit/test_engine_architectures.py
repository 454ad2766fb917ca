"""Greedy output under continuous batching equals generate() for every supported causal-LM family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from schemas.errors import EngineError
from schemas.sampling import SamplingParams
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest, StepOutput
from workers.model.random_init import build_random_model, special_token_ids, tokenizer_vocab_size

WINDOW = 8  # sliding window smaller than most prompts, so windowed layers really drop keys
TINY: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2
)


def _config(family: str) -> Any:
    common: dict[str, Any] = dict(vocab_size=tokenizer_vocab_size(), max_position_embeddings=256, **special_token_ids())
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=common["vocab_size"],
            n_positions=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=common["bos_token_id"],
            eos_token_id=common["eos_token_id"],
        )
    gqa: dict[str, Any] = dict(num_key_value_heads=2)
    if family == "llama":
        return transformers.LlamaConfig(**TINY, **gqa, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(**TINY, **gqa, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(**TINY, **gqa, head_dim=16, **common)
    if family == "mistral":
        return transformers.MistralConfig(**TINY, **gqa, sliding_window=WINDOW, **common)
    if family == "phi3":
        return transformers.Phi3Config(**TINY, **gqa, **common)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **TINY, **gqa, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, **common
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **TINY, **gqa, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, **common
        )
    raise AssertionError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "phi3", "gemma2", "gemma3"]
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and keeps running far away",
    "Kafka",
    "Streaming inference with continuous batching on a distributed log of tokens, written once, read many times",
    "Café 日本 🚀",
    "What is a partition?",
]


def _reference(model: Any, prompt: list[int], max_tokens: int, eos: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_tokens,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    ids = out[0, len(prompt) :].tolist()
    return ids[: ids.index(eos)] if eos in ids else ids


def _record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Keep the logits the runner hands the sampler, per request in order."""
    seen: dict[str, list[torch.Tensor]] = {}
    decode, prefill = engine.runner.decode, engine.runner.prefill

    def on_decode(row_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        out = decode(row_ids, tokens)
        for rid, row in zip(row_ids, out, strict=True):
            seen.setdefault(rid, []).append(row.clone())
        return out

    def on_prefill(row_ids: Sequence[str], chunks: Sequence[Sequence[int]], want: Sequence[bool]) -> torch.Tensor:
        out = prefill(row_ids, chunks, want)
        for rid, row in zip([r for r, w in zip(row_ids, want, strict=True) if w], out, strict=True):
            seen.setdefault(rid, []).append(row.clone())
        return out

    engine.runner.decode = on_decode  # type: ignore[method-assign]
    engine.runner.prefill = on_prefill  # type: ignore[method-assign]
    return seen


def _collect(results: dict[str, list[int]], outputs: list[StepOutput]) -> None:
    for out in outputs:
        results.setdefault(out.request_id, []).extend(out.token_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_under_continuous_batching_equals_generate(family: str, tmp_path: Path) -> None:
    directory = build_random_model(tmp_path / family, _config(family))
    # Three rows at most and 16-token prefill chunks: long prompts are cut, rows join and leave mid-run.
    engine = Engine.load(str(directory), device="cpu", max_batch_size=3, prefill_chunk_tokens=16, kv_cache_mb=64)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    eos = special_token_ids()["eos_token_id"]
    requests = [
        EngineRequest(f"r{i}", engine.encode_prompt(p), SamplingParams(max_tokens=3 + 3 * i, temperature=0))
        for i, p in enumerate(PROMPTS)
    ]
    logits = _record_logits(engine)
    results: dict[str, list[int]] = {}
    for request in requests[:2]:
        engine.add(request)
    for request in requests[2:]:
        _collect(results, engine.step())
        engine.add(request)
    while engine.has_work():
        _collect(results, engine.step())
    for request in requests:
        rid = request.request_id
        expected = _reference(reference, request.prompt_ids, request.params.max_tokens, eos)
        assert results[rid] == expected, rid
        # Greedy tokens can agree by luck; the logits at every generated position must agree too.
        with torch.no_grad():
            full = reference(torch.tensor([request.prompt_ids + results[rid]])).logits[0]
        start = len(request.prompt_ids) - 1
        want = full[start : start + len(logits[rid])]
        torch.testing.assert_close(torch.stack(logits[rid]), want, atol=1e-4, rtol=1e-4)


def test_unsupported_family_fails_at_load(tmp_path: Path) -> None:
    config = transformers.GPTNeoXConfig(
        vocab_size=tokenizer_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    directory = build_random_model(tmp_path / "neox", config)
    with pytest.raises(EngineError, match=r"gpt_neox.*not supported.*supported: gemma2"):
        Engine.load(str(directory), device="cpu")

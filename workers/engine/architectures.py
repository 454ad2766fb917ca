"""Which causal-LM families the engine serves, checked at load so an untested one fails there, never with wrong text."""

from __future__ import annotations

from typing import Any

from schemas.errors import EngineError

# model_type values whose greedy output under continuous batching equals generate(), proven by
# tests/unit/test_engine_architectures.py. Each routes attention through transformers' attention interface, keeps
# one key/value cache per layer and takes explicit position ids (rotary or learned absolute positions).
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gemma2", "gemma3_text"})


def check_architecture(model: Any) -> None:
    """Raise EngineError naming the family and the supported ones unless ``model`` is of a tested family."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED:
        raise EngineError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by the engine; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise EngineError(f"{type(model).__name__} with cross-attention is not supported by the engine")
    if getattr(config, "use_bidirectional_attention", False):
        raise EngineError(f"{type(model).__name__} with bidirectional attention is an encoder, not a causal LM")


def context_length(config: Any) -> int:
    """Longest sequence (prompt + completion) the model takes: its position table or trained context."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise EngineError(f"{type(config).__name__} names no context length (max_position_embeddings)")

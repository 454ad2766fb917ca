"""Random-weight models of any transformers config with the built-in tokenizer, for tests and benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from workers.model.registry import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tokenizer_vocab_size() -> int:
    """Vocabulary of the built-in tokenizer (the size a random model built here must have)."""
    import json

    config = json.loads((default_model_dir() / "config.json").read_text())
    return int(config["vocab_size"])


def special_token_ids() -> dict[str, Any]:
    """bos/eos/pad ids of the built-in tokenizer, for the configs of random models."""
    import json

    config = json.loads((default_model_dir() / "config.json").read_text())
    return {key: int(config[key]) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def build_random_model(directory: Path, config: Any, seed: int = 0) -> Path:
    """Save a randomly initialised causal LM of ``config`` with the built-in tokenizer files (idempotent)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        source = default_model_dir() / name
        if source.is_file():
            shutil.copy(source, directory / name)
    return directory


def llama_config(hidden: int, layers: int, heads: int, intermediate: int, context: int = 2048) -> Any:
    """A Llama config over the built-in tokenizer (the shape of the ~25M and ~120M benchmark models)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer_vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        **special_token_ids(),
    )

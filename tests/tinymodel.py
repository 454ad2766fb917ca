"""A tiny randomly initialised Llama with a byte-level BPE tokenizer, saved like any HF model, for worker tests."""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Kafka is a distributed log; tokens stream through it.",
    "Café, naïve, déjà vu — 日本語のテキスト and emoji 🚀🔥 mixed in.",
    "Hello world! Streaming inference with continuous batching.",
]


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write config, weights and tokenizer to ``directory`` (idempotent) and return it."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_random_llama(directory: Path, seed: int = 0) -> Path:
    """The built-in model's architecture and tokenizer (chat template included) with random weights: vLLM loads it
    too, and greedy runs are long (the end-of-sequence token is one of 4,096)."""
    from transformers import AutoConfig

    from workers.model.random_init import build_random_model
    from workers.model.registry import default_model_dir

    config = AutoConfig.from_pretrained(default_model_dir())
    config.initializer_range = 0.1  # peaked logits: greedy choices that batching noise cannot flip
    return build_random_model(directory, config, seed)

"""Train the default model (byte-level BPE tokenizer + small Llama) on CPU and save it with save_pretrained."""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workers.model.corpus import Corpus, build_corpus

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)

# Each turn is "<|role|>\n{content}<|eos|>", so generation after "<|assistant|>\n" stops at the tokenizer's eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines the built model; the defaults are what ``workers/model/default`` was built with."""

    seed: int = 0
    corpus_chars: int = 3_000_000
    vocab_size: int = 4096
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 512
    seq_len: int = 256
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    minutes: float = 6.0
    threads: int = 2


def train_tokenizer(corpus: Corpus, settings: BuildSettings) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the corpus, wrapped for transformers with bos/eos/pad and the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols are in the base vocabulary, so any unicode text encodes and decodes losslessly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chat_lines = (m["content"] for chat in corpus.chats for m in chat)
    tokenizer.train_from_iterator([*corpus.texts, *chat_lines], trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=settings.max_positions,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode_corpus(corpus: Corpus, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """One long token stream: each text as bos+text+eos, each chat rendered through the chat template."""
    documents = [f"{BOS}{text}{EOS}" for text in corpus.texts]
    for chat in corpus.chats:
        messages = [{"role": m["role"], "content": m["content"]} for m in chat]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert isinstance(rendered, str)
        documents.append(rendered)
    random.Random(0).shuffle(documents)
    stream: list[int] = []
    for start in range(0, len(documents), 2048):
        for ids in tokenizer(documents[start : start + 2048], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
    return torch.tensor(stream, dtype=torch.long)


def make_model(tokenizer: PreTrainedTokenizerFast, settings: BuildSettings) -> LlamaForCausalLM:
    """A small Llama with tied embeddings, sized by ``settings``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _learning_rate(settings: BuildSettings, step: int, progress: float) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    # Cosine over wall-clock progress, because the budget is time rather than a step count.
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def train(model: LlamaForCausalLM, stream: torch.Tensor, settings: BuildSettings, progress: bool) -> float:
    """Train on random windows of ``stream`` until the time budget runs out; return the smoothed final loss."""
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    budget = settings.minutes * 60.0
    window = settings.seq_len
    model.train()
    smoothed = float("nan")
    started = time.monotonic()
    step = 0
    with tqdm(total=round(budget), unit="s", desc="training", disable=not progress) as bar:
        while (elapsed := time.monotonic() - started) < budget:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(settings, step, elapsed / budget)
            starts = torch.randint(0, len(stream) - window, (settings.batch_size,), generator=generator)
            batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            value = float(loss.item())
            smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
            step += 1
            bar.update(min(round(time.monotonic() - started), bar.total) - bar.n)
            bar.set_postfix(step=step, loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed


def build_model(out: Path, settings: BuildSettings | None = None, progress: bool = True) -> Path:
    """Build corpus, tokenizer and model and save them (safetensors) into ``out``; return ``out``."""
    settings = settings or BuildSettings()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    corpus = build_corpus(seed=settings.seed, target_chars=settings.corpus_chars)
    tokenizer = train_tokenizer(corpus, settings)
    stream = encode_corpus(corpus, tokenizer)
    if progress:
        print(f"corpus: {corpus.char_count()} chars, {len(stream)} tokens, vocab {len(tokenizer)}")
    model = make_model(tokenizer, settings)
    loss = train(model, stream, settings, progress)
    if progress:
        print(f"final loss {loss:.3f}, {sum(p.numel() for p in model.parameters())} parameters")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m workers.model.build --out DIR [--minutes M]``."""
    parser = argparse.ArgumentParser(description="Train the tokenrelay default model on CPU.")
    parser.add_argument("--out", type=Path, required=True, help="directory to save the model and tokenizer into")
    parser.add_argument("--minutes", type=float, default=BuildSettings.minutes, help="training time budget")
    parser.add_argument("--seed", type=int, default=BuildSettings.seed)
    args = parser.parse_args(argv)
    build_model(args.out, BuildSettings(minutes=args.minutes, seed=args.seed))


if __name__ == "__main__":
    main()

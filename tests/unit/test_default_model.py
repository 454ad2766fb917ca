"""The committed default model loads through the ordinary from_pretrained path and behaves sanely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.model import default_model_dir, resolve_model

MODEL_DIR = Path(__file__).resolve().parents[2] / "workers" / "model" / "default"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def test_registry_points_at_committed_dir() -> None:
    assert default_model_dir() == MODEL_DIR
    assert resolve_model("default") == str(MODEL_DIR)
    assert resolve_model("some/hub-id") == "some/hub-id"


def test_special_tokens(tokenizer: Any) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_chat_template_with_generation_prompt(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>\nBe brief.<|eos|><|user|>\nHello!<|eos|><|assistant|>\n"
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")


@pytest.mark.parametrize("text", ["héllo 世界 🙂", "tabs\tand\nnewlines  ", "\x00\x7f\u200b\U0001d518nicode"])
def test_unicode_round_trip(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_greedy_generation_is_deterministic(tokenizer: Any, model: Any) -> None:
    inputs = tokenizer("The weather today", return_tensors="pt")
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(first, second)
    new = first[0, inputs["input_ids"].shape[1] :].tolist()
    assert any(token not in tokenizer.all_special_ids for token in new)

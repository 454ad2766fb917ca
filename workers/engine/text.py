"""Text on both sides of an engine: prompts to token ids (chat template included), and a run's tokens back to text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.stops import StopMatcher


class TextCodec:
    """A transformers tokenizer as the worker uses it, whichever engine generates."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.has_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self._rust = getattr(tokenizer, "_tokenizer", None)

    def encode_prompt(self, prompt: str, messages: Sequence[tuple[str, str]] | None = None) -> list[int]:
        if messages:
            chat = [{"role": role, "content": content} for role, content in messages]
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in self.tokenizer(prompt)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        if self._rust is not None:
            return str(self._rust.decode(list(ids), skip_special_tokens=True))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))


class TextStream:
    """The text of one run, token by token: whole characters only, cut before a stop string, continuing the text
    an earlier run of the request already published (``resume_ids``/``resume_text``)."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...], resume_ids: Sequence[int] = (), resume_text: str = ""):
        self.detok = IncrementalDetokenizer(codec.decode, resume_ids, resume_text)
        self.stops = StopMatcher(stop)

    def push(self, token: int) -> tuple[str, bool]:
        """The text this token completes, and whether it reached a stop string (the run then ends here)."""
        return self.stops.feed(self.detok.push([token]))

    def final(self) -> str:
        """What is still held back, at the end of the run."""
        tail, stopped = self.stops.feed(self.detok.flush())
        return tail + ("" if stopped else self.stops.flush())

"""Text on both sides of an engine: prompts to token ids (chat template included), and a run's tokens back to text."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from functools import cache
from typing import Any

from schemas.errors import EngineRefused
from schemas.records import TokenLogprob, TopLogprob
from schemas.structured import tools_of
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.stops import StopMatcher
from workers.engine.types import Turn


class TextCodec:
    """A transformers tokenizer as the worker uses it, whichever engine generates."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.has_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self._rust = getattr(tokenizer, "_tokenizer", None)
        decoder = getattr(self._rust, "decoder", None)
        self._byte_level = decoder is not None and "ByteLevel" in repr(decoder)
        self._bytes: dict[int, bytes] = {}

    def encode_prompt(self, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None) -> list[int]:
        """The prompt's token ids; chat turns go through the chat template, with ``tools`` (the record's JSON) when
        the model may call them: a template that does not show the model the tools refuses the request."""
        if messages:
            chat = [template_turn(m) for m in messages]
            functions = tools_of(tools) or None
            text = self._render(chat, functions)
            if functions and text == self._render(chat, None):
                raise EngineRefused("this model's chat template does not show tools to the model; send no tools")
            return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        return [int(t) for t in self.tokenizer(prompt)["input_ids"]]

    def _render(self, chat: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        return str(self.tokenizer.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=False))

    def decode(self, ids: Sequence[int]) -> str:
        if self._rust is not None:
            return str(self._rust.decode(list(ids), skip_special_tokens=True))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def token_bytes(self, token: int) -> bytes:
        """The token's bytes as the tokenizer spells it alone: byte-level BPE pieces map to their bytes, a
        SentencePiece byte token (``<0xE6>``) to its byte, anything else to the UTF-8 of its decoded text."""
        found = self._bytes.get(token)
        if found is None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            table = _byte_decoder()
            if isinstance(piece, str) and self._byte_level and all(c in table for c in piece):
                found = bytes(table[c] for c in piece)
            elif isinstance(piece, str) and _BYTE_TOKEN.fullmatch(piece):
                found = bytes([int(piece[3:5], 16)])
            else:
                found = self.decode([token]).encode()
            self._bytes[token] = found
        return found

    def with_bytes(self, logprob: TokenLogprob) -> TokenLogprob:
        """A sampled token's logprob with the bytes of it and of its alternatives (what OpenAI's answers show)."""
        top = tuple(TopLogprob(t.token_id, t.logprob, self.token_bytes(t.token_id)) for t in logprob.top)
        return TokenLogprob(logprob.token_id, logprob.logprob, top, self.token_bytes(logprob.token_id))


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is spelled with -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def template_turn(turn: Turn) -> dict[str, Any]:
    """A chat turn as transformers' chat templates take it: an assistant's tool calls with their arguments as objects
    (templates write them with ``tojson``), a tool's answer with the call it answers."""
    if isinstance(turn, tuple):
        return {"role": turn[0], "content": turn[1]}
    out: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        calls = json.loads(turn.tool_calls)
        for call in calls:
            function = call.get("function", {})
            with contextlib.suppress(ValueError):  # not JSON: the template gets the text as the client sent it
                function["arguments"] = json.loads(function.get("arguments") or "{}")
        out["tool_calls"] = calls
    if turn.tool_call_id is not None:
        out["tool_call_id"] = turn.tool_call_id
    if turn.name is not None:
        out["name"] = turn.name
    return out


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

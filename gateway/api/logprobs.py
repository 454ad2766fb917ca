"""Token logprobs in OpenAI's shapes (chat, completions, Responses), pure, from the view's ``token`` event entries.

An entry is ``{"token_id", "logprob", "bytes", "top": [{"token_id", "logprob", "bytes"}]}`` (``schemas.view``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Entry = dict[str, Any]


def token_text(raw: Sequence[int]) -> str:
    """A token's text as OpenAI spells it: its UTF-8, or ``bytes:\\xNN...`` for a token that is part of a character."""
    data = bytes(raw)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _alternative(entry: Entry) -> dict[str, Any]:
    return {"token": token_text(entry["bytes"]), "logprob": entry["logprob"], "bytes": list(entry["bytes"])}


def chat_content(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content`` (also the Responses API's ``logprobs`` of an output text)."""
    return [{**_alternative(e), "top_logprobs": [_alternative(t) for t in e["top"]]} for e in entries]


def completions_logprobs(entries: Sequence[Entry], offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; ``offset`` is where the first token starts in the choice's text."""
    tokens = [token_text(e["bytes"]) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{token_text(t["bytes"]): t["logprob"] for t in e["top"]} for e in entries],
        "text_offset": offsets,
    }


def text_length(entries: Sequence[Entry]) -> int:
    """Characters the entries' tokens spell (where the next token's ``text_offset`` starts)."""
    return sum(len(token_text(e["bytes"])) for e in entries)

"""Incremental detokenization that never emits a broken UTF-8 character."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
REPLACEMENT = "\ufffd"
# Tokens decoded again before the unread ones when resuming, so the boundary decodes as in one piece.
PREFIX_WINDOW = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; text ending in U+FFFD waits for the rest of its bytes."""

    def __init__(self, decode: Decode, emitted_ids: Sequence[int] = (), emitted_text: str = ""):
        self._decode = decode
        self.ids: list[int] = list(emitted_ids)
        self._prefix = 0
        self._read = 0
        self.leftover = ""
        if self.ids:
            self._resume(emitted_text)

    def _resume(self, emitted_text: str) -> None:
        # Read up to the last token boundary where the decoded text is whole; the rest is decoded with the next token.
        read = len(self.ids)
        while read > 0 and self._decode(self.ids[:read]).endswith(REPLACEMENT):
            read -= 1
        self._read = read
        self._prefix = max(0, read - PREFIX_WINDOW)
        full = self._decode(self.ids[:read])
        # Text decoded but never emitted (held back as a possible stop-string prefix) goes out with the next delta.
        self.leftover = full[len(emitted_text) :] if full.startswith(emitted_text) else ""

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now complete (may be empty)."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        out = self.leftover
        self.leftover = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            out += new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
        return out

    def flush(self) -> str:
        """Whatever text the remaining tokens decode to, at the end of generation."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        out = self.leftover + new_text[len(prefix_text) :]
        self.leftover = ""
        self._prefix = self._read = len(self.ids)
        return out

"""Grammar-constrained decoding (xgrammar): a constraint compiled once per model, a matcher per request that masks
the tokens its grammar does not allow and advances on each token the request generates."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import xgrammar

from schemas.errors import EngineError, EngineRefused
from schemas.structured import Constraint

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept per model (one per distinct schema or tool set)


# Control characters a constrained output may hold raw: none in JSON (xgrammar's strings would let them through,
# and JSON parsers refuse them), the line breaks and tab of a tool call's tags and blanks.
JSON_CONTROLS = b""
TAG_CONTROLS = b"\t\n\r"


class Matcher:
    """One request's place in its grammar; the end-of-sequence tokens are allowed only where the grammar may end."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, vocab_size: int, allowed: torch.Tensor):
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._allowed = allowed

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` (one bit per token)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
        words = self._allowed.numel()
        bitmask[row, :words] &= self._allowed
        bitmask[row, words:] = 0  # logits wider than the vocabulary (a padded output layer): never those

    def accept(self, token: int) -> bool:
        """Advance over ``token``; False (the state unchanged) when the grammar does not allow it."""
        return bool(self._matcher.accept_token(token))

    def replay(self, tokens: Iterable[int]) -> None:
        """Advance over tokens an earlier run generated (a continued request): its grammar state is rebuilt."""
        for n, token in enumerate(tokens):
            if not self.accept(token):
                raise EngineError(f"the grammar does not allow token {token} at position {n} of the continued run")

    @property
    def done(self) -> bool:
        """The grammar has ended (an end-of-sequence token was accepted where it may end)."""
        return bool(self._matcher.is_terminated())


class Grammars:
    """Compiles constraints for one tokenizer, each once (the most recent CACHE_SIZE are kept); thread-safe (the
    worker compiles at admission, on its event loop; the engine at ``add``, on its step thread)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]):
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids) or None
        )
        pieces = list(info.decoded_vocab)
        self._allowed = {
            "json_schema": _without_controls(pieces, vocab_size, JSON_CONTROLS),
            "structural_tag": _without_controls(pieces, vocab_size, TAG_CONTROLS),
        }
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[Constraint, xgrammar.CompiledGrammar] = OrderedDict()
        self.compiles = 0
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        with self._lock:
            return self._compile(constraint)

    def _compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        compiled = self._cache.get(constraint)
        if compiled is not None:
            self._cache.move_to_end(constraint)
            return compiled
        try:
            if constraint.kind == "json_schema":
                # Compact JSON (no free whitespace): a model cannot pad its answer with blanks up to max_tokens.
                compiled = self._compiler.compile_json_schema(
                    constraint.spec, any_whitespace=False, separators=(",", ":")
                )
            else:
                compiled = self._compiler.compile_structural_tag(json.loads(constraint.spec))
        except (RuntimeError, ValueError, TypeError) as exc:
            what = "the tools' parameter schemas" if constraint.kind == "structural_tag" else "the JSON schema"
            raise EngineRefused(
                f"{what} cannot be compiled to a grammar: {exc}", code="response_format_invalid"
            ) from None
        self.compiles += 1
        self._cache[constraint] = compiled
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, constraint: Constraint, replay: Sequence[int] = ()) -> Matcher:
        """A new matcher of ``constraint``, advanced over ``replay`` (the tokens of earlier runs)."""
        matcher = Matcher(self.compile(constraint), self.vocab_size, self._allowed[constraint.kind])
        matcher.replay(replay)
        return matcher


def _without_controls(pieces: Sequence[bytes], vocab_size: int, keep: bytes) -> torch.Tensor:
    """A bitmask row (xgrammar's layout: bit j of word k is token 32k + j) of the tokens with no control character
    other than ``keep``."""
    bits = [0] * ((vocab_size + 31) // 32)
    for token in range(vocab_size):
        piece = pieces[token] if token < len(pieces) else b""
        if not any(b < 0x20 and b not in keep for b in piece):
            bits[token >> 5] |= 1 << (token & 31)
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32)


def mask(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
    """Set to -inf, in place, the logits [B, V] of tokens each row's grammar does not allow (rows without one pay
    nothing)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = xgrammar.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for i in rows:
        matcher = matchers[i]
        assert matcher is not None
        matcher.fill(bitmask, i)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)

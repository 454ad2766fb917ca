"""Sampling parameters of a request: one type from the HTTP edge to the sampler, with its ranges checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from schemas.errors import FieldError

MAX_STOP = 8
MAX_STOP_CHARS = 256
MAX_TOP_K = 1_000_000
INT64 = 1 << 63


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens: greedy when ``temperature`` is 0; ``top_k`` 0 and ``top_p`` 1 turn those filters off."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def check(self, max_tokens_limit: int) -> SamplingParams:
        """These parameters, or a FieldError naming the first one out of range (for records that skip the edge)."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise FieldError("max_tokens", f"must be between 1 and {max_tokens_limit}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise FieldError("temperature", "must be between 0.0 and 2.0")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise FieldError("top_p", "must be greater than 0.0 and at most 1.0")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise FieldError("top_k", f"must be between 0 and {MAX_TOP_K}")
        if self.seed is not None and not -INT64 <= self.seed < INT64:
            raise FieldError("seed", "must be a 64-bit integer")
        if len(self.stop) > MAX_STOP:
            raise FieldError("stop", f"at most {MAX_STOP} strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise FieldError("stop", f"strings must have 1 to {MAX_STOP_CHARS} characters")
        return self

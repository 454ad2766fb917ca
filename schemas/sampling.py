"""Sampling parameters of a request: one type from the HTTP edge to the sampler, with its ranges checked once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.errors import FieldError

MAX_STOP = 8
MAX_STOP_CHARS = 256
MAX_TOP_K = 1_000_000
INT64 = 1 << 63
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 2.0
MAX_BIAS = 100.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens: greedy when ``temperature`` is 0; ``top_k`` 0, ``top_p`` 1, ``min_p`` 0, the penalties at
    their defaults and an empty ``logit_bias`` turn those off. ``n`` choices share one prefill. ``response_format``,
    ``tools`` and ``tool_choice`` are JSON text as the request record carries them (None: none)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: Mapping[str, float] = field(default_factory=dict)  # token id (decimal) -> bias
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: str | None = None
    tools: str | None = None
    tool_choice: str | None = None

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes any logit (the sampler then needs the tokens seen so far)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def bias(self) -> dict[int, float]:
        """``logit_bias`` with integer token ids (checked by ``check``)."""
        return {int(k): v for k, v in self.logit_bias.items()}

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise FieldError(name, f"must be between -{MAX_PENALTY} and {MAX_PENALTY}")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise FieldError("repetition_penalty", f"must be greater than 0.0 and at most {MAX_REPETITION_PENALTY}")
        if not (math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise FieldError("min_p", "must be between 0.0 and 1.0")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise FieldError("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens")
        for key, value in self.logit_bias.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
                raise FieldError("logit_bias", f"keys must be token ids (non-negative integers), not {key[:20]!r}")
            if not (math.isfinite(value) and -MAX_BIAS <= value <= MAX_BIAS):
                raise FieldError("logit_bias", f"biases must be between -{MAX_BIAS:g} and {MAX_BIAS:g}")
        if not 1 <= self.n <= MAX_N:
            raise FieldError("n", f"must be between 1 and {MAX_N}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise FieldError("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs set to true")
        return self

"""The engine's attention: masks from each row's own positions, grouped-query heads without copying the cache."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from schemas.errors import EngineError

ATTENTION_NAME = "tokenrelay"


@dataclass(slots=True)
class StepMasks:
    """Where the queries of one forward sit: ``positions`` [B, n] per row; keys are columns 0..kv_len-1."""

    positions: torch.Tensor
    kv_len: int
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int) -> torch.Tensor:
        """Boolean [B, 1, n, kv_len]: causal, and within ``window`` keys of the query when window > 0."""
        found = self._masks.get(window)
        if found is None:
            cols = torch.arange(self.kv_len, device=self.positions.device).view(1, 1, -1)
            pos = self.positions.unsqueeze(-1)
            allowed = cols <= pos
            if window > 0:
                allowed = allowed & (cols > pos - window)
            found = self._masks[window] = allowed.unsqueeze(1)
        return found


CURRENT: ContextVar[StepMasks | None] = ContextVar("tokenrelay_step_masks", default=None)


def attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [B, H, n, D], key/value [B, Hkv, T, D] -> [B, n, H, D]."""
    step = CURRENT.get()
    if step is None:
        raise EngineError("the engine's attention ran outside an engine step (use a separately loaded model)")
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    mask = step.mask(int(sliding_window or 0))
    # Grouped-query heads: fold each group's query heads into the query length, so every query head meets its
    # shared key head without repeating (copying) the whole cache as transformers' sdpa path does under a mask.
    q = query.reshape(batch, kv_heads, rep * n, dim) if rep > 1 else query
    if rep > 1 and n > 1:
        mask = mask.repeat(1, 1, rep, 1)
    if softcap:
        scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else dim**-0.5)
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype), value)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, n, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make the engine's attention known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    return ATTENTION_NAME

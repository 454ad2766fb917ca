"""Model execution: one left-padded batch with a KV cache that is re-packed when its rows change."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from schemas.errors import EngineError

log = logging.getLogger(__name__)


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda with bf16 when present, else cpu with fp32; explicit settings win."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        return dev, getattr(torch, dtype)
    except AttributeError:
        raise EngineError(f"unknown dtype {dtype!r}") from None


@dataclass(slots=True)
class _Batch:
    ids: list[str]
    cache: Any
    mask: torch.Tensor  # [B, T] 1 for real tokens; rows are left-padded
    lengths: torch.Tensor  # [B] real tokens per row (= next position id)


class ModelRunner:
    """Runs prefill for newly admitted rows and one decode step for all rows; knows nothing of requests."""

    def __init__(self, model: Any, device: torch.device):
        self.model = model
        self.device = device
        self._batch: _Batch | None = None

    @property
    def row_ids(self) -> list[str]:
        return list(self._batch.ids) if self._batch else []

    @torch.inference_mode()
    def prefill(self, ids: Sequence[str], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the prompts of new rows, add them to the batch; logits of their last position [N, V]."""
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        self._merge(_Batch(list(ids), out.past_key_values, mask, lengths))
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row (in ``row_ids`` order); logits of the next position [B, V]."""
        batch = self._require()
        input_ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device).unsqueeze(-1)
        ones = torch.ones((len(batch.ids), 1), dtype=batch.mask.dtype, device=self.device)
        batch.mask = torch.cat([batch.mask, ones], dim=-1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=batch.mask,
            position_ids=batch.lengths.unsqueeze(-1),
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.cache = out.past_key_values
        batch.lengths = batch.lengths + 1
        return out.logits[:, -1, :]

    def keep(self, ids: Sequence[str]) -> None:
        """Drop every row not in ``ids``; trims padding no remaining row needs."""
        batch = self._batch
        if batch is None:
            return
        wanted = set(ids)
        rows = [i for i, rid in enumerate(batch.ids) if rid in wanted]
        if len(rows) == len(batch.ids):
            return
        if not rows:
            self._batch = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = batch.mask.index_select(0, index)
        # Columns that are padding in every remaining row can go.
        start = int((mask.shape[1] - mask.sum(-1)).min().item())
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]
        self._batch = _Batch(
            [batch.ids[i] for i in rows], batch.cache, mask[:, start:], batch.lengths.index_select(0, index)
        )

    def _merge(self, new: _Batch) -> None:
        old = self._batch
        if old is None:
            self._batch = new
            return
        width = max(old.mask.shape[1], new.mask.shape[1])
        for old_layer, new_layer in zip(old.cache.layers, new.cache.layers, strict=True):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)], dim=0)
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)], dim=0
            )
        mask = torch.cat([_left_pad_mask(old.mask, width), _left_pad_mask(new.mask, width)], dim=0)
        self._batch = _Batch([*old.ids, *new.ids], old.cache, mask, torch.cat([old.lengths, new.lengths]))

    def _require(self) -> _Batch:
        if self._batch is None:
            raise EngineError("decode with an empty batch")
        return self._batch


def _left_pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - kv.shape[-2]
    return F.pad(kv, (0, 0, missing, 0)) if missing else kv


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return F.pad(mask, (missing, 0)) if missing else mask

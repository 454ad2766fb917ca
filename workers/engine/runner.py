"""Model execution: prefill chunks and decode steps over a slot KV cache written in place; knows nothing of requests."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from schemas.errors import EngineError
from workers.engine.attention import CURRENT, StepMasks
from workers.engine.kvcache import CacheShape, SlotCache

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


class _Probe:
    """A cache that only records the key/value shapes each layer hands it (to size the real cache)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[torch.Size, torch.Size, torch.dtype]] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen[layer_idx] = (key_states.shape, value_states.shape, key_states.dtype)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


@torch.inference_mode()
def probe_cache_shape(model: Any, device: torch.device) -> CacheShape:
    """Run one token through the model and read each layer's key/value shape off the cache calls."""
    probe = _Probe()
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    token_masks = StepMasks(torch.zeros((1, 1), dtype=torch.long, device=device), 1)
    reset = CURRENT.set(token_masks)
    try:
        model(input_ids=token, position_ids=token, past_key_values=probe, use_cache=True, logits_to_keep=1)
    finally:
        CURRENT.reset(reset)
    layers = getattr(model.config, "num_hidden_layers", None) or len(probe.seen)
    if not probe.seen or sorted(probe.seen) != list(range(layers)):
        raise EngineError(
            f"{type(model).__name__} does not keep one key/value cache per layer through the cache interface "
            f"(layers seen: {sorted(probe.seen)} of {layers}); this architecture is not supported"
        )
    shapes = {(k[1], k[3], v[3], dt) for k, v, dt in probe.seen.values()}
    if len(shapes) != 1:
        raise EngineError(f"{type(model).__name__} has layers with different key/value shapes; not supported")
    kv_heads, key_dim, value_dim, dtype = shapes.pop()
    return CacheShape(layers, kv_heads, key_dim, value_dim, dtype)


class ModelRunner:
    """Rows live in cache slots 0..n-1 (a leaving row's slot is filled by the last one); each row's tokens sit at
    columns 0..length-1, so a row's position is its column and nothing is ever left-padded or concatenated."""

    def __init__(self, model: Any, device: torch.device, budget_tokens: int, max_rows: int):
        self.model = model
        self.device = device
        self.budget_tokens = budget_tokens
        self.max_rows = max_rows
        self.cache = SlotCache(probe_cache_shape(model, device), device)
        self.slots: list[str] = []
        self.lengths: list[int] = []
        self._slot_of: dict[str, int] = {}

    @property
    def bytes_per_token(self) -> int:
        return self.cache.shape.bytes_per_token

    @property
    def row_ids(self) -> list[str]:
        return list(self.slots)

    def add(self, row_id: str, width: int) -> None:
        """Give ``row_id`` a slot; ``width`` is the most tokens any row in the batch may reach (sizes the cache)."""
        self._slot_of[row_id] = len(self.slots)
        self.slots.append(row_id)
        self.lengths.append(0)
        self._ensure(len(self.slots), width + 1)  # one spare column takes padding's writes

    def fork(self, row_id: str, new_id: str) -> None:
        """Give ``new_id`` a slot holding a copy of ``row_id``'s cache (a further choice of one prefilled prompt)."""
        src = self._slot_of[row_id]
        self._slot_of[new_id] = len(self.slots)
        self.slots.append(new_id)
        self.lengths.append(self.lengths[src])
        self._ensure(len(self.slots), self.cache.width)
        self.cache.move_row(src, len(self.slots) - 1, self.lengths[src])

    def remove(self, row_id: str) -> None:
        slot = self._slot_of.pop(row_id, None)
        if slot is None:
            return
        last = len(self.slots) - 1
        if slot != last:
            moved = self.slots[last]
            self.cache.move_row(last, slot, self.lengths[last])
            self.slots[slot], self.lengths[slot] = moved, self.lengths[last]
            self._slot_of[moved] = slot
        self.slots.pop()
        self.lengths.pop()

    def length(self, row_id: str) -> int:
        return self.lengths[self._slot_of[row_id]]

    def _ensure(self, rows: int, width: int) -> None:
        cache = self.cache
        if rows <= cache.rows and width <= cache.width:
            return
        # Grow rows in steps to reallocate rarely, but never past the budget: then allocate exactly what is asked.
        new_rows = max(rows, min(self.max_rows, max(cache.rows * 2, 4)))
        new_width = max(width, cache.width)
        if new_rows * (new_width - 1) > self.budget_tokens:
            new_rows, new_width = rows, width
        used_width = max(self.lengths, default=0)
        cache.resize(new_rows, new_width, len(self.slots), used_width)
        log.info("kv cache %d rows x %d tokens (%.1f MiB)", new_rows, new_width, cache.nbytes / 2**20)

    @torch.inference_mode()
    def decode(self, row_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each of ``row_ids``; logits of their next position [len(row_ids), V]."""
        slots = [self._slot_of[r] for r in row_ids]
        count = max(slots) + 1
        scratch = self.cache.width - 1
        # Rows in the range that are not decoding (mid-prefill) ride along writing to the spare column.
        ids = [0] * count
        cols = [scratch] * count
        for slot, token in zip(slots, tokens, strict=True):
            ids[slot] = token
            cols[slot] = self.lengths[slot]
        # Positions must stay inside the model's range (learned position tables), so riders keep their own.
        positions = torch.tensor(self.lengths[:count], dtype=torch.long, device=self.device).unsqueeze(-1)
        kv_len = max(self.lengths[s] for s in slots) + 1
        logits = self._forward(
            list(range(count)),
            torch.tensor(ids, device=self.device).unsqueeze(-1),
            positions,
            torch.tensor(cols, dtype=torch.long, device=self.device).unsqueeze(-1),
            kv_len,
            1,
        )
        for slot in slots:
            self.lengths[slot] += 1
        index = torch.tensor(slots, device=self.device)
        return logits[:, -1, :].index_select(0, index)

    @torch.inference_mode()
    def prefill(self, row_ids: Sequence[str], chunks: Sequence[Sequence[int]], want: Sequence[bool]) -> torch.Tensor:
        """Feed each row its next chunk of prompt; logits after the last token of each row with ``want`` [k, V]."""
        slots = [self._slot_of[r] for r in row_ids]
        width = max(len(c) for c in chunks)
        scratch = self.cache.width - 1
        ids = torch.zeros((len(chunks), width), dtype=torch.long)
        positions = torch.zeros((len(chunks), width), dtype=torch.long)
        cols = torch.full((len(chunks), width), scratch, dtype=torch.long)
        for row, (slot, chunk) in enumerate(zip(slots, chunks, strict=True)):
            start, n = self.lengths[slot], len(chunk)
            ids[row, :n] = torch.tensor(list(chunk), dtype=torch.long)
            positions[row, :n] = torch.arange(start, start + n)
            positions[row, n:] = start + n - 1  # padding: any position in the model's range
            cols[row, :n] = positions[row, :n]
        kv_len = max(self.lengths[s] + len(c) for s, c in zip(slots, chunks, strict=True))
        last = [len(c) - 1 for c, w in zip(chunks, want, strict=True) if w]
        keep = sorted(set(last))
        logits = self._forward(
            slots,
            ids.to(self.device),
            positions.to(self.device),
            cols.to(self.device),
            kv_len,
            torch.tensor(keep, device=self.device) if keep else 1,
        )
        for slot, chunk in zip(slots, chunks, strict=True):
            self.lengths[slot] += len(chunk)
        if not keep:
            return logits[:0, -1, :]
        rows = [i for i, w in enumerate(want) if w]
        row_index = torch.tensor(rows, device=self.device)
        col_index = torch.tensor([keep.index(c) for c in last], device=self.device)
        return logits[row_index, col_index, :]

    def _forward(
        self,
        slots: list[int],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cols: torch.Tensor,
        kv_len: int,
        keep: int | torch.Tensor,
    ) -> torch.Tensor:
        self.cache.bind(slots, cols, kv_len)
        reset = CURRENT.set(StepMasks(positions, kv_len))
        try:
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        finally:
            CURRENT.reset(reset)
        return out.logits

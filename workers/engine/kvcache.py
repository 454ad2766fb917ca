"""A KV cache allocated once per shape and written in place: one slot (row) per request, columns = positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class CacheShape:
    """Per layer: key/value heads, head dims; the cache is [rows, kv_heads, width, dim] for each of K and V."""

    layers: int
    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.layers * self.kv_heads * (self.key_dim + self.value_dim) * itemsize


class SlotCache:
    """What a transformers model calls as ``past_key_values``: ``update()`` writes the new keys/values at each row's
    own positions and returns the rows' keys/values up to the step's key length (a view when the rows are adjacent)."""

    is_compileable = False

    def __init__(self, shape: CacheShape, device: torch.device):
        self.shape = shape
        self.device = device
        self.rows = 0
        self.width = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._row_index = torch.zeros(0, dtype=torch.long)
        self._cols = torch.zeros(0, dtype=torch.long)
        self._kv_len = 0
        self._decode = False
        self._flat_rows = self._flat_cols = torch.zeros(0, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return self.rows * self.width * self.shape.bytes_per_token

    def resize(self, rows: int, width: int, used_rows: int, used_width: int) -> None:
        """Reallocate to ``rows`` x ``width``, keeping the first ``used_rows`` rows' first ``used_width`` columns."""
        keep_rows, keep_cols = min(used_rows, rows, self.rows), min(used_width, width, self.width)
        s = self.shape
        new_keys, new_values = [], []
        for layer in range(s.layers):
            # Zeros, not empty: masked keys still meet the softmax, and NaN garbage there would poison the row.
            k = torch.zeros((rows, s.kv_heads, width, s.key_dim), dtype=s.dtype, device=self.device)
            v = torch.zeros((rows, s.kv_heads, width, s.value_dim), dtype=s.dtype, device=self.device)
            if keep_rows and keep_cols:
                k[:keep_rows, :, :keep_cols] = self.keys[layer][:keep_rows, :, :keep_cols]
                v[:keep_rows, :, :keep_cols] = self.values[layer][:keep_rows, :, :keep_cols]
            new_keys.append(k)
            new_values.append(v)
            # Free the old layer before allocating the next, so a resize needs one layer of headroom, not a cache.
            if layer < len(self.keys):
                self.keys[layer] = self.values[layer] = torch.empty(0)
        self.keys, self.values = new_keys, new_values
        self.rows, self.width = rows, width

    def move_row(self, src: int, dst: int, used_width: int) -> None:
        """Copy row ``src`` into row ``dst`` (compaction when a request leaves; a fork of a prefilled prompt)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :used_width] = k[src, :, :used_width]
            v[dst, :, :used_width] = v[src, :, :used_width]

    def bind(self, rows: list[int], cols: torch.Tensor, kv_len: int) -> None:
        """Set where the next forward writes: batch row i goes to slot ``rows[i]`` at columns ``cols[i]`` [B, n]."""
        first = rows[0]
        adjacent = rows == list(range(first, first + len(rows)))
        self._rows = slice(first, first + len(rows)) if adjacent else torch.tensor(rows, device=self.device)
        self._row_index = torch.tensor(rows, device=self.device).unsqueeze(-1)
        self._cols = cols
        self._kv_len = kv_len
        self._decode = cols.shape[1] == 1 and adjacent
        self._flat_rows, self._flat_cols = self._row_index.squeeze(-1), cols.squeeze(-1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._decode:
            k[self._flat_rows, :, self._flat_cols] = key_states[:, :, 0].to(k.dtype)
            v[self._flat_rows, :, self._flat_cols] = value_states[:, :, 0].to(v.dtype)
        else:
            k[self._row_index, :, self._cols] = key_states.transpose(1, 2).to(k.dtype)
            v[self._row_index, :, self._cols] = value_states.transpose(1, 2).to(v.dtype)
        return k[self._rows, :, : self._kv_len], v[self._rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def __len__(self) -> int:
        return self.shape.layers

"""Per-request sampling: greedy, temperature, top-k, top-p, with a seeded generator per request."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from schemas.sampling import SamplingParams


@dataclass(slots=True)
class RowSampler:
    """Sampling state of one request: its parameters and its own random generator."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed)

    def uniform(self) -> float:
        return float(torch.rand(1, generator=self.generator).item())


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Next token for every row of ``logits`` [B, V]; one uniform draw per sampled row keeps seeds reproducible."""
    logits = logits.float()
    greedy_ids = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    result = greedy_ids.tolist()
    if not sampled:
        return [int(t) for t in result]
    index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
    scores = logits.index_select(0, index)
    temperature = torch.tensor([rows[i].params.temperature for i in sampled], device=scores.device).unsqueeze(-1)
    scores = scores / temperature
    sorted_scores, sorted_ids = scores.sort(dim=-1, descending=True)
    vocab = scores.shape[-1]
    top_k = torch.tensor(
        [rows[i].params.top_k if 0 < rows[i].params.top_k < vocab else vocab for i in sampled], device=scores.device
    )
    ranks = torch.arange(vocab, device=scores.device).unsqueeze(0)
    sorted_scores = sorted_scores.masked_fill(ranks >= top_k.unsqueeze(-1), float("-inf"))
    probs = sorted_scores.softmax(dim=-1)
    top_p = torch.tensor([rows[i].params.top_p for i in sampled], device=scores.device).unsqueeze(-1)
    # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p) & (ranks > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    draws = torch.tensor([rows[i].uniform() for i in sampled], device=scores.device).unsqueeze(-1)
    picks = torch.searchsorted(cdf, draws * cdf[:, -1:]).clamp(max=vocab - 1)
    chosen = sorted_ids.gather(-1, picks).squeeze(-1).tolist()
    for row_index, token in zip(sampled, chosen, strict=True):
        result[row_index] = token
    return [int(t) for t in result]

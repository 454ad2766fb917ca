"""Per-row sampling, vectorized over the batch: logit bias, penalties, temperature, top-k, top-p, min-p, logprobs.

The order is vLLM's: logit bias, then the repetition penalty (HF/vLLM: over prompt and generated tokens, a seen
token's positive logit divided by it, its negative logit multiplied), then the frequency and presence penalties
(OpenAI: over the generated tokens only, ``logit - count * frequency - (count > 0) * presence``), then temperature,
then the top-k, top-p and min-p filters, then one draw.

Logprobs are of the distribution the token was drawn from before it was truncated: the log-softmax of the biased
and penalized logits divided by the temperature (by 1 for greedy rows, whose pick is that distribution's most likely
token). vLLM's default is the raw model distribution instead (``logprobs_mode="raw_logprobs"``); here a greedy
token is always the first of its ``top_logprobs``, and a penalty that changed the choice shows in its logprob.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from schemas.records import TokenLogprob, TopLogprob
from schemas.sampling import SamplingParams


@dataclass(slots=True)
class RowSampler:
    """Sampling state of one row (a request's choice): its parameters, its own random generator (seeded with the
    request's seed plus the choice index) and, when penalized, the token counts it needs."""

    params: SamplingParams
    prompt_ids: Sequence[int] = ()
    generated: Sequence[int] = ()  # tokens an earlier run already generated (a continuation)
    index: int = 0
    generator: torch.Generator = field(init=False)
    counts: torch.Tensor | None = field(init=False, default=None)  # [V] times each token was generated
    seen: torch.Tensor | None = field(init=False, default=None)  # [V] in the prompt or generated
    bias_ids: torch.Tensor | None = field(init=False, default=None)
    bias_values: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        # Each choice of a seeded request draws its own reproducible sequence (choice 0 the seed's own).
        self.generator.manual_seed(seed if not self.index else (seed + self.index) % (1 << 63))
        bias = self.params.bias()
        if bias:
            self.bias_ids = torch.tensor(list(bias), dtype=torch.long)
            self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def uniform(self) -> float:
        return float(torch.rand(1, generator=self.generator).item())

    def _penalty_state(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None or self.seen is None:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            prompt = [t for t in self.prompt_ids if 0 <= t < vocab]
            if prompt:
                self.seen[torch.tensor(prompt, device=device)] = True
            for token in self.generated:
                self.record(token)
        return self.counts, self.seen

    def record(self, token: int) -> None:
        """Count a generated token (for the penalties)."""
        if self.counts is not None and self.seen is not None and 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True


@dataclass(frozen=True, slots=True)
class Sampled:
    """The token picked for a row, and its logprob when the row asked for logprobs."""

    token: int
    logprob: TokenLogprob | None = None


def _bias(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    biased = [i for i, r in enumerate(rows) if r.bias_ids is not None]
    if not biased:
        return logits
    vocab = logits.shape[-1]
    row_index, cols, values = [], [], []
    for i in biased:
        ids, vals = rows[i].bias_ids, rows[i].bias_values
        assert ids is not None and vals is not None
        keep = ids < vocab  # the engine refuses ids outside the vocabulary; this keeps a test double's logits safe
        ids, vals = ids[keep], vals[keep]
        row_index.append(torch.full_like(ids, i))
        cols.append(ids)
        values.append(vals)
    device = logits.device
    index = (torch.cat(row_index).to(device), torch.cat(cols).to(device))
    return logits.index_put(index, torch.cat(values).to(device), accumulate=True)


def _penalize(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    penalized = [i for i, r in enumerate(rows) if r.params.penalized]
    if not penalized:
        return logits
    vocab, device = logits.shape[-1], logits.device
    state = [rows[i]._penalty_state(vocab, device) for i in penalized]
    every = len(penalized) == len(rows)
    index = torch.tensor(penalized, device=device)
    scores = logits if every else logits.index_select(0, index)
    params = [rows[i].params for i in penalized]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device).unsqueeze(-1)

    if any(p.repetition_penalty != 1.0 for p in params):
        repetition = column([p.repetition_penalty for p in params])
        seen = torch.stack([s for _, s in state])
        factor = torch.where(scores > 0, 1.0 / repetition, repetition)
        scores = scores * torch.where(seen, factor, 1.0)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        counts = torch.stack([c for c, _ in state])
        frequency, presence = (
            column([p.frequency_penalty for p in params]),
            column([p.presence_penalty for p in params]),
        )
        scores = scores - frequency * counts - presence * (counts > 0).float()
    return scores if every else logits.index_copy(0, index, scores)


def _logprobs(logits: torch.Tensor, rows: list[RowSampler], tokens: list[int]) -> list[TokenLogprob | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return out
    device = logits.device
    index = torch.tensor(wanted, device=device)
    temperature = torch.tensor(
        [rows[i].params.temperature if not rows[i].params.greedy else 1.0 for i in wanted], device=device
    ).unsqueeze(-1)
    lp = (logits.index_select(0, index) / temperature).log_softmax(dim=-1)
    chosen = lp.gather(-1, torch.tensor([tokens[i] for i in wanted], device=device).unsqueeze(-1)).squeeze(-1)
    k = max(rows[i].params.top_logprobs for i in wanted)
    top_values, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    chosen_list, top_v, top_i = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.top_logprobs
        top = tuple(TopLogprob(int(t), float(v)) for t, v in zip(top_i[j][:n], top_v[j][:n], strict=True))
        out[i] = TokenLogprob(tokens[i], float(chosen_list[j]), top)
    return out


def sample_rows(logits: torch.Tensor, rows: list[RowSampler]) -> list[Sampled]:
    """Next token for every row of ``logits`` [B, V]; one uniform draw per sampled row keeps seeds reproducible."""
    logits = _penalize(_bias(logits.float(), rows), rows)
    result = logits.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
        scores = logits.index_select(0, index)
        temperature = torch.tensor([rows[i].params.temperature for i in sampled], device=scores.device).unsqueeze(-1)
        scores = scores / temperature
        sorted_scores, sorted_ids = scores.sort(dim=-1, descending=True)
        vocab = scores.shape[-1]
        top_k = torch.tensor(
            [rows[i].params.top_k if 0 < rows[i].params.top_k < vocab else vocab for i in sampled],
            device=scores.device,
        )
        ranks = torch.arange(vocab, device=scores.device).unsqueeze(0)
        sorted_scores = sorted_scores.masked_fill(ranks >= top_k.unsqueeze(-1), float("-inf"))
        probs = sorted_scores.softmax(dim=-1)
        top_p = torch.tensor([rows[i].params.top_p for i in sampled], device=scores.device).unsqueeze(-1)
        min_p = torch.tensor([rows[i].params.min_p for i in sampled], device=scores.device).unsqueeze(-1)
        # Keep the smallest prefix whose mass reaches top_p, and only tokens at least min_p times as likely as the
        # most likely one; the most likely token always stays.
        before = probs.cumsum(dim=-1) - probs
        drop = (before >= top_p) | (probs < min_p * probs[:, :1])
        probs = probs.masked_fill(drop & (ranks > 0), 0.0)
        cdf = probs.cumsum(dim=-1)
        draws = torch.tensor([rows[i].uniform() for i in sampled], device=scores.device).unsqueeze(-1)
        picks = torch.searchsorted(cdf, draws * cdf[:, -1:]).clamp(max=vocab - 1)
        chosen = sorted_ids.gather(-1, picks).squeeze(-1).tolist()
        for row_index, token in zip(sampled, chosen, strict=True):
            result[row_index] = token
    tokens = [int(t) for t in result]
    for row, token in zip(rows, tokens, strict=True):
        row.record(token)
    logprobs = _logprobs(logits, rows, tokens)
    return [Sampled(t, lp) for t, lp in zip(tokens, logprobs, strict=True)]


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Next token ids only (what a caller without logprobs needs)."""
    return [s.token for s in sample_rows(logits, rows)]

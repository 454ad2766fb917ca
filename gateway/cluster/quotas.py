"""Per-key quotas of the whole fleet, as a pure fold of the quotas log: sliding windows, reservations, settlement.

Every gateway reads the whole ``quotas`` topic and folds the same records in the same order (records are keyed by
tenant, so one tenant's records share one partition). A gateway that would admit a request writes a ``Reserve`` (its
tokens: prompt estimate + max_tokens) and waits to read it back: **the log decides**. A Reserve that fits the limits
at its place in the log (counting only the reservations before it that fitted) is granted, any other is void; every
gateway's fold reaches the same verdict, so the fleet never admits more than the limit, however late the gateways
read each other. The gateway that reads the request's events partition writes a ``Settle`` with the real usage when
the request ends, which corrects the tokens at the time of the reservation and frees its concurrent slot.

Before writing, a gateway checks its own view (the log plus its reservations not read back yet) and refuses at once
what surely does not fit: that answer needs no write.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

WINDOW_MS = 60_000  # the "per minute" of the limits: a sliding window of 60 one-second buckets
BUCKET_MS = 1_000
PENDING_MS = 30_000  # a reservation not read back by then was not written (its produce failed)
EARLY_SETTLE_MS = 120_000  # a Settle read before its Reserve waits this long for it


class Dimension(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's limits; 0 is no limit."""

    rpm: int = 0
    tpm: int = 0
    concurrent: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrent)

    def of(self, dimension: Dimension) -> int:
        if dimension is Dimension.REQUESTS:
            return self.rpm
        if dimension is Dimension.TOKENS:
            return self.tpm
        return self.concurrent


def parse_limits(text: str) -> Limits:
    """``RPM/TPM/CONCURRENT`` (each a count, 0 for none); ValueError otherwise."""
    parts = text.split("/")
    if len(parts) != 3:
        raise ValueError(f"{text!r}: write RPM/TPM/CONCURRENT, e.g. 600/100000/8 (0: no limit)")
    values = [int(p.strip() or "0") for p in parts]
    if any(v < 0 for v in values):
        raise ValueError(f"{text!r}: limits cannot be negative")
    return Limits(*values)


# --- records of the quotas topic ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reserve:
    """A gateway admitted ``request_id`` of ``tenant`` at ``ts_ms``, holding ``tokens`` until it settles."""

    request_id: str
    tenant: str
    gateway: str
    ts_ms: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Settle:
    """``request_id`` ended having used ``tokens`` (prompt + completion; negative: not known, the reservation
    stands). Its concurrent slot is free either way."""

    request_id: str
    tenant: str
    ts_ms: int
    tokens: int


QuotaRecord = Reserve | Settle


def encode_record(record: QuotaRecord) -> bytes:
    kind = "reserve" if isinstance(record, Reserve) else "settle"
    body = {"kind": kind, "request_id": record.request_id, "tenant": record.tenant, "ts_ms": record.ts_ms}
    body["tokens"] = record.tokens
    if isinstance(record, Reserve):
        body["gateway"] = record.gateway
    return json.dumps(body, separators=(",", ":")).encode()


def decode_record(data: bytes) -> QuotaRecord | None:
    """The record, or None for bytes that are not one (another version's, or garbage: skipped, never fatal)."""
    try:
        raw = json.loads(data)
        common = (str(raw["request_id"]), str(raw["tenant"]), int(raw["ts_ms"]), int(raw["tokens"]))
        if raw["kind"] == "reserve":
            return Reserve(common[0], common[1], str(raw["gateway"]), common[2], common[3])
        if raw["kind"] == "settle":
            return Settle(*common)
    except (ValueError, TypeError, KeyError):
        return None
    return None


# --- window maths ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Window:
    """Amounts per one-second bucket; what lies in the last minute counts."""

    buckets: dict[int, int] = field(default_factory=dict)

    def add(self, ts_ms: int, amount: int) -> None:
        b = ts_ms // BUCKET_MS
        self.buckets[b] = self.buckets.get(b, 0) + amount

    def _first(self, now_ms: int) -> int:
        """The oldest bucket still in the window at ``now_ms`` (bucket b leaves it at b * BUCKET_MS + WINDOW_MS)."""
        return (now_ms - WINDOW_MS) // BUCKET_MS + 1

    def total(self, now_ms: int) -> int:
        first = self._first(now_ms)
        return max(0, sum(v for b, v in self.buckets.items() if b >= first))

    def prune(self, now_ms: int) -> None:
        first = self._first(now_ms)
        for b in [b for b in self.buckets if b < first]:
            del self.buckets[b]

    def until_free(self, now_ms: int, amount: int) -> int:
        """Ms until at least ``amount`` of what the window holds now has left it (0 when ``amount`` <= 0)."""
        if amount <= 0:
            return 0
        first = self._first(now_ms)
        freed = 0
        for b in sorted(b for b in self.buckets if b >= first):
            freed += self.buckets[b]
            if freed >= amount:
                return max(0, b * BUCKET_MS + WINDOW_MS - now_ms)
        return WINDOW_MS

    def until_empty(self, now_ms: int) -> int:
        """Ms until everything the window holds now has left it (OpenAI's ``x-ratelimit-reset-*``)."""
        first = self._first(now_ms)
        used = [b for b, v in self.buckets.items() if b >= first and v > 0]
        return max(0, max(used) * BUCKET_MS + WINDOW_MS - now_ms) if used else 0


@dataclass(slots=True)
class Usage:
    """One key's usage as the log shows it."""

    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)
    open: dict[str, Reserve] = field(default_factory=dict)  # admitted, not ended


@dataclass(frozen=True, slots=True)
class Standing:
    """One dimension of one key, for the ``x-ratelimit-*`` headers."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True, slots=True)
class Refusal:
    dimension: Dimension
    retry_after_ms: int
    message: str


class QuotaBook:
    """The fleet's usage per key (the quotas log folded) and this gateway's reservations not read back yet."""

    def __init__(self, gateway: str, limits_of: Callable[[str], Limits], lease_ms: int):
        self.gateway = gateway
        self.limits_of = limits_of
        self.lease_ms = lease_ms
        self.usage: dict[str, Usage] = {}
        self.pending: dict[str, Reserve] = {}
        self.early: dict[str, Settle] = {}

    def _usage(self, tenant: str) -> Usage:
        usage = self.usage.get(tenant)
        if usage is None:
            usage = self.usage[tenant] = Usage()
        return usage

    # --- the log ---

    def apply(self, record: QuotaRecord) -> bool:
        """Fold one record of the quotas log (in log order; duplicates change nothing). For a Reserve, whether the
        log grants it: it fits the limits at its place in the log (a void one counts for nothing)."""
        if isinstance(record, Reserve):
            self.pending.pop(record.request_id, None)
            usage = self._usage(record.tenant)
            if record.request_id in usage.open:
                return True
            settled = self.early.pop(record.request_id, None)
            if self._refusals(record.tenant, record.tokens, record.ts_ms, with_pending=False):
                return False
            usage.requests.add(record.ts_ms, 1)
            if settled is not None:
                usage.tokens.add(record.ts_ms, settled.tokens if settled.tokens >= 0 else record.tokens)
                return True
            usage.tokens.add(record.ts_ms, record.tokens)
            usage.open[record.request_id] = record
            return True
        usage = self._usage(record.tenant)
        reserved = usage.open.pop(record.request_id, None)
        if reserved is None:
            self.early[record.request_id] = record  # its Reserve is not read yet (or it ended twice: harmless)
        elif record.tokens >= 0:
            usage.tokens.add(reserved.ts_ms, record.tokens - reserved.tokens)
        return False

    def expire(self, now_ms: int) -> None:
        """Forget what can no longer count: old buckets, reservations past their lease, unread pending ones."""
        # Buckets are kept PENDING_MS longer than the window: a Reserve read that late is still judged at its own
        # time with the same buckets on every gateway.
        for tenant, usage in list(self.usage.items()):
            usage.requests.prune(now_ms - PENDING_MS)
            usage.tokens.prune(now_ms - PENDING_MS)
            for request_id, reserve in list(usage.open.items()):
                if now_ms - reserve.ts_ms > self.lease_ms:
                    del usage.open[request_id]  # its end was never seen (see lease_ms): its slot comes back
            if not usage.open and not usage.requests.buckets and not usage.tokens.buckets:
                del self.usage[tenant]
        for request_id, reserve in list(self.pending.items()):
            if now_ms - reserve.ts_ms > PENDING_MS:
                del self.pending[request_id]
        for request_id, settle in list(self.early.items()):
            if now_ms - settle.ts_ms > EARLY_SETTLE_MS:
                del self.early[request_id]

    # --- admission ---

    def _used(self, tenant: str, dimension: Dimension, now_ms: int, *, with_pending: bool = True) -> int:
        """The fleet's usage as the log shows it, plus (``with_pending``) this gateway's reservations not read back."""
        usage = self.usage.get(tenant)
        mine = [r for r in self.pending.values() if r.tenant == tenant] if with_pending else []
        if dimension is Dimension.REQUESTS:
            logged = usage.requests.total(now_ms) if usage is not None else 0
            pending = sum(1 for r in mine if now_ms - r.ts_ms < WINDOW_MS)
        elif dimension is Dimension.TOKENS:
            logged = usage.tokens.total(now_ms) if usage is not None else 0
            pending = sum(r.tokens for r in mine if now_ms - r.ts_ms < WINDOW_MS)
        else:
            logged = len(usage.open) if usage is not None else 0
            pending = len(mine)
        return logged + pending

    def _refusals(self, tenant: str, tokens: int, now_ms: int, *, with_pending: bool) -> list[Refusal]:
        limits = self.limits_of(tenant)
        refusals = []
        for dimension, cost in ((Dimension.REQUESTS, 1), (Dimension.TOKENS, tokens), (Dimension.CONCURRENT, 1)):
            limit = limits.of(dimension)
            if not limit:
                continue
            if cost > limit:
                refusals.append(
                    Refusal(dimension, WINDOW_MS, f"this request needs {cost} {dimension} but the limit is {limit}")
                )
                continue
            used = self._used(tenant, dimension, now_ms, with_pending=with_pending)
            if used + cost > limit:
                retry = self._retry_after(tenant, dimension, used + cost - limit, now_ms)
                refusals.append(Refusal(dimension, retry, ""))
        return refusals

    def check(self, tenant: str, tokens: int, now_ms: int) -> Refusal | None:
        """Why a request of ``tokens`` would be refused now (the dimension that waits longest), or None."""
        refusals = self._refusals(tenant, tokens, now_ms, with_pending=True)
        if not refusals:
            return None
        worst = max(refusals, key=lambda r: r.retry_after_ms)
        limit = self.limits_of(tenant).of(worst.dimension)
        return Refusal(
            worst.dimension,
            worst.retry_after_ms,
            worst.message or f"rate limit reached for {worst.dimension} ({limit})",
        )

    def _retry_after(self, tenant: str, dimension: Dimension, excess: int, now_ms: int) -> int:
        usage = self.usage.get(tenant)
        if dimension is Dimension.CONCURRENT or usage is None or excess <= 0:
            return BUCKET_MS  # a slot frees when a request ends, or a pending reservation is read back
        window = usage.requests if dimension is Dimension.REQUESTS else usage.tokens
        return max(BUCKET_MS // 10, window.until_free(now_ms, excess))

    def admit(self, request_id: str, tenant: str, tokens: int, now_ms: int) -> Reserve | Refusal:
        """A Reserve to write to the quotas log (held as pending until read back: its verdict), or why not."""
        refusal = self.check(tenant, tokens, now_ms)
        if refusal is not None:
            return refusal
        reserve = Reserve(request_id, tenant, self.gateway, now_ms, tokens)
        self.pending[request_id] = reserve
        return reserve

    def release(self, request_id: str) -> None:
        """A reservation whose request was not submitted after all (its Settle with 0 tokens follows in the log)."""
        self.pending.pop(request_id, None)

    # --- what the headers say ---

    def standing(self, tenant: str, now_ms: int) -> dict[Dimension, Standing]:
        """Limit, remaining and time to reset of each limited dimension of ``tenant``."""
        limits = self.limits_of(tenant)
        usage = self.usage.get(tenant)
        out: dict[Dimension, Standing] = {}
        for dimension in Dimension:
            limit = limits.of(dimension)
            if not limit:
                continue
            used = self._used(tenant, dimension, now_ms)
            reset = 0
            if usage is not None and dimension is not Dimension.CONCURRENT:
                window = usage.requests if dimension is Dimension.REQUESTS else usage.tokens
                reset = window.until_empty(now_ms)
            out[dimension] = Standing(limit, max(0, limit - used), reset)
        return out


def duration(ms: int) -> str:
    """A time span as OpenAI writes it in ``x-ratelimit-reset-*``: ``250ms``, ``1s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def ratelimit_headers(standing: dict[Dimension, Standing]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, and ours for the concurrent limit."""
    headers: dict[str, str] = {}
    for dimension, s in standing.items():
        headers[f"x-ratelimit-limit-{dimension}"] = str(s.limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(s.remaining)
        if dimension is not Dimension.CONCURRENT:
            headers[f"x-ratelimit-reset-{dimension}"] = duration(s.reset_ms)
    return headers


def retry_after_s(ms: int) -> int:
    """Whole seconds for ``Retry-After`` (at least 1: 0 would invite an immediate retry)."""
    return max(1, math.ceil(ms / 1000))


def estimate_tokens(text_chars: int, max_tokens: int) -> int:
    """What a request reserves: its prompt at about 4 characters per token (no tokenizer at the edge) + max_tokens."""
    return math.ceil(text_chars / 4) + max_tokens

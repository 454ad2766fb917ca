"""Pure usage and latency aggregation: log histograms, tumbling windows, idempotent per-partition state."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from schemas.records import Accepted, Deleted, Delta, Failed, Finished, Started, TokenEvent

# Buckets grow by 2**(1/8): a percentile read from a bucket is within ~4.4 % of the true value,
# and 1 ms .. 1 h fits in ~180 buckets whatever the traffic, so table values stay small.
GAMMA = 2.0 ** (1 / 8)
_LOG_GAMMA = math.log(GAMMA)
MIN_VALUE_MS = 0.01
MAX_WINDOWS = 120
PERCENTILES = (0.5, 0.9, 0.95, 0.99)
LATENCY_KINDS = ("ttft", "itl", "e2e")
UNKNOWN = "unknown"

JSON = dict[str, Any]


def bucket_of(value_ms: float) -> int:
    """Index of the log bucket holding ``value_ms``."""
    return math.floor(math.log(max(value_ms, MIN_VALUE_MS)) / _LOG_GAMMA)


def bucket_value(index: int) -> float:
    """Representative value of a bucket: the geometric middle of its bounds."""
    return float(GAMMA ** (index + 0.5))


@dataclass(slots=True)
class Histogram:
    """Sparse log-bucketed histogram; mergeable by adding counts."""

    counts: dict[int, int] = field(default_factory=dict)

    def add(self, value_ms: float, n: int = 1) -> None:
        b = bucket_of(value_ms)
        self.counts[b] = self.counts.get(b, 0) + n

    def merge(self, other: Histogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (``q`` in 0..1) read from the buckets; None when empty."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return bucket_value(b)
        return bucket_value(max(self.counts))  # pragma: no cover - rank <= total always stops the loop

    def summary(self) -> JSON:
        out: JSON = {"count": self.total}
        for q in PERCENTILES:
            value = self.percentile(q)
            out[f"p{round(q * 100)}"] = None if value is None else round(value, 2)
        return out

    def to_json(self) -> dict[str, int]:
        return {str(b): n for b, n in self.counts.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, int] | None) -> Histogram:
        return cls({int(b): int(n) for b, n in (data or {}).items()})


def window_start(ts_ms: int, window_s: int) -> int:
    """Start (ms) of the tumbling window of width ``window_s`` that holds ``ts_ms``."""
    width = window_s * 1000
    return ts_ms - ts_ms % width


def _new_usage() -> JSON:
    return {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}


def _new_window() -> JSON:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, **{k: {} for k in LATENCY_KINDS}}


def new_partition_state() -> JSON:
    """Aggregates of one events partition, with the offset of the last event they include."""
    return {"offset": -1, "by_model": {}, "by_tenant": {}, "windows": {}}


def new_request_info(event: TokenEvent, started: Started, partition: int, offset: int) -> JSON:
    """What analytics remembers of a request from its Started event."""
    return {
        "p": partition,
        "model": started.model or UNKNOWN,
        "tenant": started.tenant,
        "queue_ms": started.queue_ms,
        "continued": started.continued_tokens,
        "ts": event.ts_ms,
        "finished_at": None,
        "failed_at": None,
    }


@dataclass(frozen=True, slots=True)
class Latencies:
    ttft_ms: float | None
    itl_ms: float | None
    e2e_ms: float | None


def latencies(finished: Finished, info: Mapping[str, Any] | None) -> Latencies:
    """Latencies of one finished request from its Finished timings and, when known, its Started event.

    TTFT is submission to first token (queue time + the worker's ttft), inter-token latency is the mean gap
    between this run's tokens after the first, end-to-end is submission to Finished.
    """
    queue_ms = info["queue_ms"] if info else None
    ttft = finished.ttft_ms + queue_ms if queue_ms is not None else None
    itl = None
    if queue_ms is not None:
        run_tokens = finished.usage.completion_tokens - int(info.get("continued", 0) if info else 0)
        decode_ms = finished.total_ms - queue_ms - finished.ttft_ms
        if run_tokens > 1 and decode_ms >= 0:
            itl = decode_ms / (run_tokens - 1)
    e2e = float(finished.total_ms) if finished.total_ms > 0 else None
    return Latencies(None if ttft is None else float(ttft), itl, e2e)


def add_finished(state: JSON, event: TokenEvent, info: Mapping[str, Any] | None, window_s: int) -> None:
    """Count one request's Finished event into a partition state (in place)."""
    finished = event.payload
    assert isinstance(finished, Finished)
    model = info["model"] if info else UNKNOWN
    tenant = info["tenant"] if info else ""
    usage = finished.usage
    for dim, name in (("by_model", model), ("by_tenant", tenant)):
        row = state[dim].setdefault(name, _new_usage())
        row["requests"] += 1
        row["prompt_tokens"] += usage.prompt_tokens
        row["completion_tokens"] += usage.completion_tokens
    key = str(window_start(event.ts_ms, window_s))
    window = state["windows"].get(key)
    if window is None:
        window = state["windows"][key] = _new_window()
        _trim_windows(state["windows"])
        if key not in state["windows"]:
            return  # older than every window kept: usage counted above, latency too old to matter
    window["requests"] += 1
    window["prompt_tokens"] += usage.prompt_tokens
    window["completion_tokens"] += usage.completion_tokens
    lat = latencies(finished, info)
    for kind, value in (("ttft", lat.ttft_ms), ("itl", lat.itl_ms), ("e2e", lat.e2e_ms)):
        if value is not None:
            hist = Histogram.from_json(window[kind])
            hist.add(value)
            window[kind] = hist.to_json()


def add_failed(state: JSON, info: Mapping[str, Any] | None) -> None:
    """Count one request's Failed event into a partition state (in place)."""
    model = info["model"] if info else UNKNOWN
    tenant = info["tenant"] if info else ""
    for dim, name in (("by_model", model), ("by_tenant", tenant)):
        state[dim].setdefault(name, _new_usage())["failed"] += 1


def _trim_windows(windows: dict[str, JSON]) -> None:
    if len(windows) > MAX_WINDOWS:
        for key in sorted(windows, key=int)[: len(windows) - MAX_WINDOWS]:
            del windows[key]


@dataclass(slots=True)
class Outcome:
    """What applying one event changes: the request entry (None: unchanged) and whether the partition state moved."""

    request: JSON | None = None
    state_changed: bool = False


def apply_event(
    state: JSON, info: JSON | None, event: TokenEvent, partition: int, offset: int, window_s: int
) -> Outcome:
    """Apply one event of ``partition`` at ``offset`` to the partition's state and the request's entry.

    Idempotent under replay: an offset at or below ``state["offset"]`` is already in the aggregates, and a
    terminal event is counted only once per request (the entry remembers the offset that counted it), so a
    crash between the two table writes, a replay after a restart, or a second run of the same request never
    counts twice. ``state`` is changed in place; the caller writes back what the outcome says.
    """
    payload = event.payload
    replay = offset <= state["offset"]
    match payload:
        case Started():
            if info is not None and (info["finished_at"] is not None or info["failed_at"] is not None):
                return Outcome()  # a later run's Started, or a replay: the request is already done
            return Outcome(request=new_request_info(event, payload, partition, offset))
        case Finished() | Failed():
            mark = "finished_at" if isinstance(payload, Finished) else "failed_at"
            counted_at = info.get(mark) if info is not None else None
            entry = (
                dict(info) if info is not None else {"p": partition, "model": UNKNOWN, "tenant": "", "queue_ms": None}
            )
            entry.setdefault("finished_at", None)
            entry.setdefault("failed_at", None)
            other = entry["failed_at"] if mark == "finished_at" else entry["finished_at"]
            if (counted_at is not None and counted_at != offset) or other is not None:
                # Another terminal event already counted this request: a request ends once (as the run log's fold
                # says), even when a later run finishes one that a Failed had already ended (a submit that timed
                # out and was then delivered all the same).
                return Outcome(state_changed=_advance(state, offset))
            entry[mark] = offset
            entry["ts"] = event.ts_ms
            if replay:
                return Outcome(request=entry if counted_at is None else None)
            if isinstance(payload, Finished):
                add_finished(state, event, info, window_s)
            else:
                add_failed(state, info)
            state["offset"] = offset
            return Outcome(request=entry if counted_at is None else None, state_changed=True)
        case Accepted() | Delta() | Deleted():
            return Outcome()  # neither counts: usage and latency come from Started and the terminal event
        case _:
            assert_never(payload)


def _advance(state: JSON, offset: int) -> bool:
    if offset > state["offset"]:
        state["offset"] = offset
        return True
    return False


# ----------------------------------------------------------------------------------------- views


def merge_states(states: Iterable[Mapping[str, Any]]) -> JSON:
    """One state from the states of every partition: usage rows added, windows merged by start."""
    by_model: dict[str, JSON] = {}
    by_tenant: dict[str, JSON] = {}
    windows: dict[int, JSON] = {}
    for state in states:
        for target, rows in ((by_model, state.get("by_model", {})), (by_tenant, state.get("by_tenant", {}))):
            for name, row in rows.items():
                acc = target.setdefault(name, _new_usage())
                for k in acc:
                    acc[k] += int(row.get(k, 0))
        for key, window in state.get("windows", {}).items():
            acc = windows.setdefault(int(key), {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
            for k in ("requests", "prompt_tokens", "completion_tokens"):
                acc[k] += int(window.get(k, 0))
            for kind in LATENCY_KINDS:
                hist = acc.setdefault(kind, Histogram())
                hist.merge(Histogram.from_json(window.get(kind)))
    return {"by_model": by_model, "by_tenant": by_tenant, "windows": windows}


def combine_reports(reports: Iterable[Mapping[str, Any]], partitions: int) -> dict[str, JSON] | None:
    """The partition states of a whole analytics cluster from each instance's report, or None while a partition is
    owned by no instance (a rebalance under way).

    A report is ``{"owned": [partition, ...], "partitions": {"<partition>": state}}``, states of owned partitions
    only. A partition two instances both report (one has not yet seen the rebalance) takes the state that has
    processed further.
    """
    owned: set[int] = set()
    states: dict[str, JSON] = {}
    for report in reports:
        owned.update(int(p) for p in report.get("owned", ()))
        for key, state in report.get("partitions", {}).items():
            if key not in states or int(state.get("offset", -1)) > int(states[key].get("offset", -1)):
                states[key] = state
    if not owned >= set(range(partitions)):
        return None
    return states


def _totals(rows: Mapping[str, JSON]) -> JSON:
    total = _new_usage()
    for row in rows.values():
        for k in total:
            total[k] += row[k]
    return total


def usage_view(merged: Mapping[str, Any], window_s: int) -> JSON:
    """The JSON of GET /usage."""
    windows = merged["windows"]
    return {
        "window_s": window_s,
        "totals": _totals(merged["by_model"]),
        "by_model": dict(sorted(merged["by_model"].items())),
        "by_tenant": dict(sorted(merged["by_tenant"].items())),
        "windows": [
            {
                "start_ms": start,
                "end_ms": start + window_s * 1000,
                "requests": windows[start]["requests"],
                "prompt_tokens": windows[start]["prompt_tokens"],
                "completion_tokens": windows[start]["completion_tokens"],
            }
            for start in sorted(windows)
        ],
    }


def latency_view(merged: Mapping[str, Any], window_s: int, recent: int = 5) -> JSON:
    """The JSON of GET /latency: percentiles per window and over the ``recent`` newest windows."""
    windows = merged["windows"]
    starts = sorted(windows)
    overall = {kind: Histogram() for kind in LATENCY_KINDS}
    for start in starts[-recent:]:
        for kind in LATENCY_KINDS:
            overall[kind].merge(windows[start][kind])
    return {
        "window_s": window_s,
        "unit": "ms",
        "recent": {"windows": min(recent, len(starts)), **{k: overall[k].summary() for k in LATENCY_KINDS}},
        "windows": [
            {
                "start_ms": start,
                "end_ms": start + window_s * 1000,
                **{kind: windows[start][kind].summary() for kind in LATENCY_KINDS},
            }
            for start in starts
        ],
    }

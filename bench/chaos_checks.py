"""The chaos run's invariants, pure: clients' traces against the log's fold, stalls by fault, memory slopes."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.fanout.subscription import make_out
from schemas.records import TokenEvent
from schemas.view import View

TERMINAL_SSE = ("done", "error")
# Kinds of load whose clients follow the native SSE stream (ids are the log's cursors).
NATIVE_KINDS = ("native", "native-batch", "cancel", "kafka")


@dataclass
class Trace:
    """What one client saw of one request, over all its connections."""

    kind: str
    request_id: str
    prompt: str
    max_tokens: int
    greedy: bool
    arrivals: list[float] = field(default_factory=list)  # monotonic time of every event received
    ids: list[str] = field(default_factory=list)  # native: the SSE id of every event, in order
    events: list[tuple[str, str]] = field(default_factory=list)  # native: (event, data) in order
    seqs: list[int] = field(default_factory=list)  # responses: the sequence_number of every event
    text: str = ""  # the text the client shows at the end (a restart replaces it, a token appends)
    terminals: int = 0  # terminal events received (more than one is a repeat)
    end: str = ""  # the last terminal: done | error | completed | incomplete | failed | cancelled | length | stop ...
    failure: str = ""  # the error code of an error end
    resumes: int = 0
    cut: bool = False  # a stream the client could not resume (OpenAI chat) was cut by a fault
    cancelled: bool = False  # the client asked to cancel it
    handle: str = ""  # what the client calls the request by (a Responses id)

    def see(self, now: float) -> None:
        self.arrivals.append(now)


@dataclass
class Folded:
    """One request as the log's fold shows it (the gateway's View over the events topic)."""

    ids: list[str]
    events: list[tuple[str, str]]
    text: str
    end: str  # done | error | "" (no terminal yet)
    finish_reason: str
    restarted: bool
    prompt_tokens: int
    completion_tokens: int
    terminal_records: int  # Finished/Failed records of the request in the log (the fold counts one)


def shown_text(events: Iterable[tuple[str, str]]) -> str:
    """The text a native client shows: started/restart set it, tokens append."""
    text = ""
    for name, data in events:
        if name in ("started", "restart"):
            text = json.loads(data).get("text", "")
        elif name == "token":
            text += json.loads(data)["text"]
    return text


def fold(request_id: str, records: Sequence[tuple[int, int, TokenEvent]]) -> Folded:
    """The log's fold of one request from its (partition, offset, event) records in log order."""
    view = View(request_id)
    ids: list[str] = []
    events: list[tuple[str, str]] = []
    for partition, offset, ev in records:
        out = view.feed(offset, ev)
        if out is not None:
            framed = make_out(partition, request_id, out)
            ids.append(framed.framed.decode().split("\n", 1)[0].removeprefix("id: "))
            events.append((str(out.event), out.data_json()))
    end, finish, prompt, completion = "", "", 0, 0
    if events and events[-1][0] in TERMINAL_SSE:
        end = events[-1][0]
        data = json.loads(events[-1][1])
        finish = data.get("finish_reason", "") if end == "done" else data.get("code", "")
        usage = data.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    terminals = sum(type(ev.payload).__name__ in ("Finished", "Failed") for _, _, ev in records)
    restarted = any(name == "restart" for name, _ in events)
    return Folded(ids, events, shown_text(events), end, finish, restarted, prompt, completion, terminals)


@dataclass
class Verdict:
    """Counts of every invariant over a run; ``broken`` lists the request ids and reasons of each violation."""

    accepted: int = 0
    ended: int = 0
    unended: list[str] = field(default_factory=list)
    repeated_end: list[str] = field(default_factory=list)  # a client saw more than one terminal event
    text_mismatch: list[str] = field(default_factory=list)
    greedy_checked: int = 0
    greedy_mismatch: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)  # a client missed an event the log has
    repeats: list[str] = field(default_factory=list)  # a client saw an event twice
    client_unfinished: list[str] = field(default_factory=list)  # a resumable client never reached the end
    restarted_streams: int = 0  # OpenAI streams that ended 'restarted' (a stream cannot take text back)
    cut_streams: int = 0  # OpenAI chat streams cut by a fault (no resume in that API); text checked as a prefix
    log_only: int = 0  # requests in the log no client followed (a submit whose answer was lost)
    log_only_unended: list[str] = field(default_factory=list)
    extra_terminal_records: int = 0  # fenced runs' terminal records the fold ignores (at-least-once; not an error)

    def invariants(self) -> dict[str, bool]:
        return {
            "every accepted request ended": not self.unended and not self.log_only_unended,
            "ended exactly once (no client saw two ends)": not self.repeated_end,
            "client text equals the log's fold": not self.text_mismatch,
            "greedy text equals its reference": not self.greedy_mismatch,
            "no gap, no repeat": not self.gaps and not self.repeats,
            "every resumable client reached the end": not self.client_unfinished,
        }


def check(
    traces: Sequence[Trace], log: Mapping[str, Sequence[tuple[int, int, TokenEvent]]], references: Mapping[str, str]
) -> Verdict:
    """Every client's trace against the log; ``references`` maps a (prompt, max_tokens) key to its greedy text."""
    v = Verdict()
    followed = {t.request_id for t in traces}
    for t in traces:
        v.accepted += 1
        f = fold(t.request_id, log.get(t.request_id, ()))
        v.extra_terminal_records += max(0, f.terminal_records - 1)
        if not f.end:
            v.unended.append(t.request_id)
            continue
        v.ended += 1
        if t.terminals > 1:
            v.repeated_end.append(t.request_id)
        if t.kind in NATIVE_KINDS:
            _check_native(v, t, f)
        else:
            _check_openai(v, t, f)
        if t.greedy and f.end == "done" and f.finish_reason in ("length", "stop"):
            v.greedy_checked += 1
            if f.text != references.get(reference_key(t.prompt, t.max_tokens)):
                v.greedy_mismatch.append(t.request_id)
    for rid, records in log.items():
        if rid in followed:
            continue
        v.log_only += 1
        f = fold(rid, records)
        v.extra_terminal_records += max(0, f.terminal_records - 1)
        if not f.end:
            v.log_only_unended.append(rid)
    return v


def _check_native(v: Verdict, t: Trace, f: Folded) -> None:
    if not t.end:
        v.client_unfinished.append(t.request_id)
    counts = Counter(t.ids)
    if any(n > 1 for n in counts.values()):
        v.repeats.append(t.request_id)
    # Strictly consecutive: what the client saw is the log's stream, or (unfinished) a prefix of it.
    if t.ids != f.ids[: len(t.ids)] or (t.end and len(t.ids) != len(f.ids)):
        v.gaps.append(t.request_id)
    if t.end and shown_text(t.events) != f.text:
        v.text_mismatch.append(t.request_id)


def _check_openai(v: Verdict, t: Trace, f: Folded) -> None:
    if t.seqs and t.seqs != list(range(t.seqs[0], t.seqs[0] + len(t.seqs))):
        (v.repeats if len(set(t.seqs)) < len(t.seqs) else v.gaps).append(t.request_id)
    if t.kind == "responses" and not t.end:
        v.client_unfinished.append(t.request_id)
    if t.end == "failed" and t.failure == "restarted":
        v.restarted_streams += 1
        if not f.restarted:
            v.text_mismatch.append(t.request_id)  # a stream failed for a restart the log does not show
        return
    if t.cut or not t.end:
        v.cut_streams += t.cut
        if not f.text.startswith(t.text):
            v.text_mismatch.append(t.request_id)
        return
    if t.text != f.text:
        v.text_mismatch.append(t.request_id)


def reference_key(prompt: str, max_tokens: int) -> str:
    return f"{max_tokens}:{prompt}"


# --- analytics against the log ----------------------------------------------------------------------------------


def log_totals(log: Mapping[str, Sequence[tuple[int, int, TokenEvent]]]) -> dict[str, int]:
    """Usage totals as the fold counts them: done requests with their usage, error requests as failed."""
    totals = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for rid, records in log.items():
        f = fold(rid, records)
        if f.end == "done":
            totals["requests"] += 1
            totals["prompt_tokens"] += f.prompt_tokens
            totals["completion_tokens"] += f.completion_tokens
        elif f.end == "error":
            totals["failed"] += 1
    return totals


# --- stalls and memory ------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str  # sigkill | sigstop | sigterm | outage
    target: str  # e.g. broker-2, worker-1, gateway-2, registry, analytics, cluster
    began: float  # monotonic
    recovered: float  # monotonic; when every component was healthy again
    detail: str = ""

    @property
    def name(self) -> str:
        return self.kind if self.kind == "outage" else f"{self.kind} {self.target.split('-')[0]}"


def longest_gap(arrivals: Sequence[float]) -> tuple[float, float, float]:
    """(length, start, end) of the longest pause between two consecutive events."""
    best = (0.0, 0.0, 0.0)
    for a, b in itertools.pairwise(arrivals):
        if b - a > best[0]:
            best = (b - a, a, b)
    return best


def stalls_by_fault(traces: Iterable[Trace], faults: Sequence[Fault]) -> dict[str, float]:
    """The longest pause any client saw that overlaps a fault of each kind (until the fault was recovered);
    'none' for pauses that overlap no fault."""
    out: dict[str, float] = {}
    for t in traces:
        for a, b in itertools.pairwise(t.arrivals):
            gap = b - a
            hit = [f.name for f in faults if a <= f.recovered and b >= f.began]
            for name in hit or ["none"]:
                out[name] = max(out.get(name, 0.0), gap)
    return out


def slope_per_hour(times: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of values over times (seconds), per hour."""
    n = len(times)
    if n < 2:
        return 0.0
    mt, mv = sum(times) / n, sum(values) / n
    var = sum((t - mt) ** 2 for t in times)
    if var == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in zip(times, values, strict=True)) / var * 3600


def memory_bounded(samples: Sequence[tuple[float, float]], allowance_mib: float = 150.0) -> tuple[bool, dict[str, Any]]:
    """Whether one process's RSS stayed bounded: its last quarter's median is within ``allowance_mib`` (and 50 %)
    of its second quarter's (start-up and warm-up excluded). Too few samples: bounded by default."""
    if len(samples) < 8:
        return True, {"samples": len(samples)}
    values = [v for _, v in samples]
    q = len(values) // 4
    early = sorted(values[q : 2 * q])[q // 2]
    late = sorted(values[-q:])[q // 2]
    slope = slope_per_hour([t for t, _ in samples], values)
    bounded = late <= early * 1.5 + allowance_mib
    return bounded, {
        "samples": len(samples),
        "early_mib": round(early, 1),
        "late_mib": round(late, 1),
        "slope_mib_per_h": round(slope, 1),
    }

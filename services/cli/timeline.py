"""One request's timeline, folded from its records in the log alone (pure): what `tokenrelay trace` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, assert_never

from schemas.records import Accepted, Deleted, Delta, Failed, Finished, Started, TokenEvent
from schemas.runlog import Change, RunLog


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record is in Kafka, and its record timestamp (ms)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Step:
    """One line of the timeline: what happened at ``ts_ms`` (the writer's clock; the Kafka record's for ``queued``)."""

    what: str  # accepted | queued | started | first_token | stopped | continued | restarted | gap | end
    ts_ms: int
    where: Position
    run_id: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RunInfo:
    """One processing attempt: who ran it, how it began, how far it got."""

    run_id: str
    worker: str
    started_ms: int
    how: str  # started | continued | restarted
    continues_run_id: str | None = None
    continued_tokens: int = 0
    first_token_ms: int | None = None
    last_event_ms: int = 0
    last_where: Position | None = None
    tokens: int = 0  # tokens this run generated (beyond those it continued)
    ended: str = "running"  # finished | failed | superseded | gap | running


@dataclass(slots=True)
class Timeline:
    request_id: str
    origin_ms: int | None = None  # times are relative to this: the Accepted, else the queued record, else the id's time
    model: str = ""
    priority: str = ""
    tenant: str = ""
    steps: list[Step] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)
    status: str = "unknown"  # unknown | queued | running | finished | failed

    def relative(self, ts_ms: int) -> int:
        return ts_ms - (self.origin_ms if self.origin_ms is not None else ts_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "status": self.status,
            "model": self.model,
            "priority": self.priority,
            "tenant": self.tenant,
            "origin_ms": self.origin_ms,
            "steps": [
                {
                    "what": s.what,
                    "at_ms": self.relative(s.ts_ms),
                    "ts_ms": s.ts_ms,
                    "topic": s.where.topic,
                    "partition": s.where.partition,
                    "offset": s.where.offset,
                    "run_id": s.run_id,
                    **s.details,
                }
                for s in self.steps
            ],
            "runs": [
                {
                    "run_id": r.run_id,
                    "worker": r.worker,
                    "how": r.how,
                    "continues_run_id": r.continues_run_id,
                    "continued_tokens": r.continued_tokens,
                    "started_at_ms": self.relative(r.started_ms),
                    "first_token_at_ms": None if r.first_token_ms is None else self.relative(r.first_token_ms),
                    "tokens": r.tokens,
                    "ended": r.ended,
                }
                for r in self.runs
            ],
        }


def build_timeline(
    request_id: str,
    events: list[tuple[Position, TokenEvent]],
    queued: Position | None = None,
    *,
    id_time_ms: int | None = None,
) -> Timeline:
    """Fold a request's events (in log order, as read from its events partition) and its request record's position.

    The run rules are ``schemas.runlog.RunLog``'s: fenced runs, duplicates and anything after the terminal event
    change nothing. A run continued by the same worker was stopped by that worker (preempted, or taken up again after
    it lost an event); a run continued by another worker was left by a worker that died or lost the partition.
    """
    fold = RunLog(request_id)
    t = Timeline(request_id)
    runs: dict[str, RunInfo] = {}
    for where, ev in events:
        change = fold.feed(ev)
        if isinstance(ev.payload, Deleted):  # it changes no run (RunLog.feed answers None): shown where it is
            t.steps.append(Step("deleted", ev.ts_ms, where, "", {"tenant": ev.payload.tenant}))
            continue
        if change is None:
            continue
        run = runs.get(ev.run_id)
        if run is not None:
            run.last_event_ms, run.last_where = ev.ts_ms, where
        p = ev.payload
        match p:
            case Accepted():
                t.model, t.priority, t.tenant = p.model, p.priority, p.tenant
                details: dict[str, Any] = {"model": p.model, "priority": p.priority}
                if p.tenant:
                    details["tenant"] = p.tenant
                if p.deadline_ms is not None:
                    details["deadline_ms"] = p.deadline_ms
                if p.background:
                    details["background"] = True
                t.steps.append(Step("accepted", ev.ts_ms, where, "", details))
            case Started():
                _start(t, runs, where, ev, p, change)
            case Delta():
                if change is Change.GAP:
                    t.steps.append(Step("gap", ev.ts_ms, where, ev.run_id, {"seq": ev.seq}))
                    if run is not None:
                        run.ended = "gap"
                    continue
                if run is None:
                    continue
                if run.first_token_ms is None:
                    run.first_token_ms = ev.ts_ms
                    if all(r.first_token_ms is None for r in t.runs if r is not run):
                        t.steps.append(Step("first_token", ev.ts_ms, where, ev.run_id, {"text": p.text}))
                run.tokens += len(p.token_ids)
            case Finished() | Failed():
                if change is Change.GAP:
                    t.steps.append(Step("gap", ev.ts_ms, where, ev.run_id, {"seq": ev.seq}))
                    if run is not None:
                        run.ended = "gap"
                    continue
                t.steps.append(Step("end", ev.ts_ms, where, ev.run_id, _end_details(p)))
                t.status = "finished" if isinstance(p, Finished) else "failed"
                if run is not None:
                    run.ended = t.status
            case Deleted():
                pass  # above
            case _:
                assert_never(p)
    if not fold.known:
        t.status = "unknown" if queued is None else "queued"
    elif fold.terminal is None:
        t.status = "running" if fold.current is not None else "queued"
    accepted = next((s for s in t.steps if s.what == "accepted"), None)
    if accepted is not None:
        # The gateway writes its Accepted beside the request record: a quick worker's Started may land before it.
        t.steps.remove(accepted)
        t.steps.insert(0, accepted)
    if queued is not None:
        step = Step("queued", queued.timestamp_ms, queued, "", {})
        t.steps.insert(1 if accepted is not None else 0, step)
    if accepted is not None:
        t.origin_ms = accepted.ts_ms
    elif queued is not None:
        t.origin_ms = queued.timestamp_ms
    else:
        t.origin_ms = id_time_ms
    if not t.model and fold.started is not None:
        t.model = fold.started.model
    if not t.tenant and fold.started is not None:
        t.tenant = fold.started.tenant
    return t


def _start(t: Timeline, runs: dict[str, RunInfo], where: Position, ev: TokenEvent, p: Started, change: Change) -> None:
    previous = t.runs[-1] if t.runs else None
    how = {Change.STARTED: "started", Change.CONTINUED: "continued"}.get(change, "restarted")
    run = RunInfo(ev.run_id, p.worker, ev.ts_ms, how, p.continues_run_id, p.continued_tokens)
    run.last_event_ms, run.last_where = ev.ts_ms, where
    details: dict[str, Any] = {"worker": p.worker, "prompt_tokens": p.prompt_tokens, "queue_ms": p.queue_ms}
    if previous is not None:
        if previous.ended == "running":
            previous.ended = "superseded"
        t.steps.append(
            Step(
                "stopped",
                previous.last_event_ms,
                previous.last_where or where,
                previous.run_id,
                {"tokens": previous.tokens},
            )
        )
        details["continues_run_id"] = p.continues_run_id
        details["continued_tokens"] = p.continued_tokens
        details["handover"] = "same_worker" if p.worker == previous.worker else "other_worker"
    t.steps.append(Step(how, ev.ts_ms, where, ev.run_id, details))
    t.runs.append(run)
    runs[ev.run_id] = run


def _end_details(p: Finished | Failed) -> dict[str, Any]:
    if isinstance(p, Finished):
        return {
            "finish_reason": p.finish_reason,
            "prompt_tokens": p.usage.prompt_tokens,
            "completion_tokens": p.usage.completion_tokens,
            "ttft_ms": p.ttft_ms,
            "total_ms": p.total_ms,
        }
    return {"error": p.code, "message": p.message, "retriable": p.retriable}


_HANDOVER = {
    "same_worker": "the same worker continued it (preempted, or taken up again after a lost event)",
    "other_worker": "another worker continued it (the first died or lost the partition)",
}


def _describe(step: Step) -> str:
    d = step.details
    match step.what:
        case "accepted":
            extra = "".join(f" {k}={d[k]}" for k in ("tenant", "deadline_ms", "background") if k in d)
            return f"model={d['model']} priority={d['priority']}{extra}"
        case "queued":
            return "request record appended"
        case "started" | "continued" | "restarted":
            text = f"worker={d['worker']} prompt_tokens={d['prompt_tokens']} queue_ms={d['queue_ms']}"
            if "handover" in d:
                text += f" after {d['continued_tokens']} tokens; {_HANDOVER[d['handover']]}"
            return text
        case "first_token":
            return f"text={d['text']!r}"
        case "stopped":
            return f"last event of the run ({d['tokens']} new tokens)"
        case "gap":
            return f"seq jumped to {d['seq']}: the run is broken from here"
        case "end" if "finish_reason" in d:
            return (
                f"finished {d['finish_reason']}: prompt_tokens={d['prompt_tokens']} "
                f"completion_tokens={d['completion_tokens']} ttft_ms={d['ttft_ms']} total_ms={d['total_ms']}"
            )
        case "end":
            return f"failed {d['error']}: {d['message']}{' (retriable)' if d['retriable'] else ''}"
    return ""


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_table(t: Timeline) -> str:
    """The timeline for a person: a header, one row per step (ms since the origin), and the runs."""
    if t.status == "unknown":
        return f"request {t.request_id}: nothing of it in the log (unknown id, or older than the retention)"
    head = [f"request {t.request_id}  status={t.status}  model={t.model or '-'}  priority={t.priority or '-'}"]
    if t.tenant:
        head[0] += f"  tenant={t.tenant}"
    if t.origin_ms is not None:
        head.append(f"times in ms since {t.steps[0].what if t.steps else 'the id'} at {_utc(t.origin_ms)}")
    rows = [("+ms", "step", "run", "where", "details")]
    for s in t.steps:
        rows.append((str(t.relative(s.ts_ms)), s.what, s.run_id[:8], str(s.where), _describe(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip()
        for r in rows
    ]
    runs = [f"runs: {len(t.runs)}"]
    for r in t.runs:
        first = "-" if r.first_token_ms is None else f"+{t.relative(r.first_token_ms)}"
        runs.append(
            f"  {r.run_id[:8]}  {r.how:<9}  worker={r.worker}  started=+{t.relative(r.started_ms)}  "
            f"first_token={first}  new_tokens={r.tokens}  ended={r.ended}"
        )
    return "\n".join([*head, "", *lines, "", *runs])

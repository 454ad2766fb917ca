"""The client's view of one request: a pure state machine from its ordered log to SSE events."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas.records import Delta, Failed, Finished, Started, TokenEvent


@dataclass(frozen=True, slots=True)
class ViewEvent:
    """One SSE event of the view, at the Kafka offset of the record it came from."""

    offset: int
    event: str
    data: dict[str, Any]
    run_id: str
    seq: int
    ts_ms: int

    @property
    def terminal(self) -> bool:
        return self.event in ("done", "error")

    def data_json(self) -> str:
        return json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class View:
    """Folds (offset, TokenEvent) records of one request, in log order, into the events a client sees.

    Run fencing: a Started with a new run_id makes that run current and older runs are ignored from then on.
    A new run that continues the current one at exactly the tokens delivered so far is seamless (no event);
    any other new run is a ``restart`` carrying the text the new run keeps. Exactly one terminal event.
    """

    request_id: str
    run_id: str | None = None
    last_seq: int = -1
    tokens: int = 0
    text: str = ""
    model: str = ""
    tenant: str = ""
    prompt_tokens: int = 0
    terminal: ViewEvent | None = None
    last_offset: int = -1
    old_runs: set[str] = field(default_factory=set)
    first_token_ts_ms: int | None = None

    def feed(self, offset: int, ev: TokenEvent) -> ViewEvent | None:
        if offset <= self.last_offset:
            return None  # a record seen twice (overlapping reads) changes nothing
        self.last_offset = offset
        if self.terminal is not None or ev.request_id != self.request_id:
            return None
        payload = ev.payload
        if isinstance(payload, Started):
            return self._started(offset, ev, payload)
        if ev.run_id != self.run_id or ev.seq <= self.last_seq:
            return None  # fenced run, run not started yet, or an at-least-once duplicate
        self.last_seq = ev.seq
        if isinstance(payload, Delta):
            self.tokens += len(payload.token_ids)
            self.text += payload.text
            if self.first_token_ts_ms is None:
                self.first_token_ts_ms = ev.ts_ms
            data: dict[str, Any] = {"seq": ev.seq, "text": payload.text, "token_ids": list(payload.token_ids)}
            return self._out(offset, ev, "token", data)
        if isinstance(payload, Finished):
            usage = {"prompt_tokens": payload.usage.prompt_tokens, "completion_tokens": payload.usage.completion_tokens}
            out = self._out(offset, ev, "done", {"finish_reason": payload.finish_reason, "usage": usage})
            self.terminal = out
            return out
        if isinstance(payload, Failed):
            data = {"code": payload.code, "message": payload.message, "retriable": payload.retriable}
            out = self._out(offset, ev, "error", data)
            self.terminal = out
            return out
        return None

    def _started(self, offset: int, ev: TokenEvent, started: Started) -> ViewEvent | None:
        if ev.run_id == self.run_id or ev.run_id in self.old_runs or ev.seq != 0:
            return None
        previous = self.run_id
        seamless = (
            previous is not None and started.continues_run_id == previous and started.continued_tokens == self.tokens
        )
        if previous is not None:
            self.old_runs.add(previous)
        self.run_id = ev.run_id
        self.last_seq = 0
        self.model = started.model or self.model
        self.tenant = started.tenant or self.tenant
        self.prompt_tokens = started.prompt_tokens
        if seamless:
            return None
        self.tokens = started.continued_tokens
        self.text = started.continued_text
        if previous is None:
            data: dict[str, Any] = {
                "run_id": ev.run_id,
                "model": started.model,
                "prompt_tokens": started.prompt_tokens,
                "queue_ms": started.queue_ms,
            }
            if started.continued_tokens:
                data["text"] = started.continued_text
            return self._out(offset, ev, "started", data)
        return self._out(offset, ev, "restart", {"run_id": ev.run_id, "text": started.continued_text})

    def _out(self, offset: int, ev: TokenEvent, name: str, data: dict[str, Any]) -> ViewEvent:
        return ViewEvent(offset, name, data, ev.run_id, ev.seq, ev.ts_ms)

    @property
    def status(self) -> str:
        if self.terminal is not None:
            return "done" if self.terminal.event == "done" else "failed"
        return "running" if self.run_id is not None else "queued"


def replay(request_id: str, log: Iterable[tuple[int, TokenEvent]]) -> list[ViewEvent]:
    """Every SSE event of a request's log, in order."""
    view = View(request_id)
    return [out for offset, ev in log if (out := view.feed(offset, ev)) is not None]

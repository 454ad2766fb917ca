"""The client's view of one request: a pure state machine from its ordered log to SSE events."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, assert_never

from schemas.records import Accepted, Deleted, Delta, Failed, Finished, Started, TokenEvent, TokenLogprob
from schemas.runlog import Change, RunLog

log = logging.getLogger(__name__)


class EventName(StrEnum):
    """The event names of the native SSE stream (the design's SSE contract); the page mirrors them as constants."""

    STARTED = "started"
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"
    RESTART = "restart"
    RESET = "reset"  # sent by the hub, not the view: a cursor that cannot resume restarts the stream


TERMINAL_EVENTS = frozenset({EventName.DONE, EventName.ERROR})


@dataclass(frozen=True, slots=True)
class ViewEvent:
    """One SSE event of the view, at the Kafka offset of the record it came from."""

    offset: int
    event: EventName
    data: dict[str, Any]
    run_id: str
    seq: int
    ts_ms: int

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def data_json(self) -> str:
        return json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class View:
    """Folds (offset, TokenEvent) records of one request, in log order, into the events a client sees.

    The run rules are ``schemas.runlog.RunLog``'s: a seamless continuation is invisible, any other new run is a
    ``restart`` carrying the text the new run keeps, a seq gap is a fault (nothing past it is forwarded), a refusal
    before any Started is an ``error``; exactly one terminal event.
    """

    request_id: str
    log: RunLog = field(init=False)
    terminal: ViewEvent | None = None
    last_offset: int = -1
    first_token_ts_ms: int | None = None

    def __post_init__(self) -> None:
        self.log = RunLog(self.request_id)

    def feed(self, offset: int, ev: TokenEvent) -> ViewEvent | None:
        if offset <= self.last_offset:
            return None  # a record seen twice (overlapping reads) changes nothing
        self.last_offset = offset
        change = self.log.feed(ev)
        if change is None or change in (Change.ACCEPTED, Change.CONTINUED):
            return None
        payload = ev.payload
        if change is Change.GAP:
            log.warning(
                "request %s: run %s skipped to seq %d; waiting for a new run", self.request_id, ev.run_id, ev.seq
            )
            return None
        match payload:
            case Accepted() | Deleted():
                return None  # the log knows the request now (Change.ACCEPTED); a client sees nothing of it
            case Started():
                if change is Change.RESTARTED:
                    return self._out(offset, ev, EventName.RESTART, {"run_id": ev.run_id, "text": self.text})
                data: dict[str, Any] = {
                    "run_id": ev.run_id,
                    "model": payload.model,
                    "prompt_tokens": payload.prompt_tokens,
                    "queue_ms": payload.queue_ms,
                }
                if payload.continued_tokens:
                    data["text"] = payload.continued_text
                return self._out(offset, ev, EventName.STARTED, data)
            case Delta():
                if self.first_token_ts_ms is None:
                    self.first_token_ts_ms = ev.ts_ms
                data = {"seq": ev.seq, "text": payload.text, "token_ids": list(payload.token_ids)}
                if payload.index:
                    data["index"] = payload.index
                if payload.logprobs:
                    data["logprobs"] = [logprob_json(lp) for lp in payload.logprobs]
                return self._out(offset, ev, EventName.TOKEN, data)
            case Finished():
                usage = {
                    "prompt_tokens": payload.usage.prompt_tokens,
                    "completion_tokens": payload.usage.completion_tokens,
                }
                done: dict[str, Any] = {"finish_reason": payload.finish_reason, "usage": usage}
                if payload.tool_calls is not None:
                    done["tool_calls"] = json.loads(payload.tool_calls)
                if payload.choice_finish_reasons:
                    done["choice_finish_reasons"] = list(payload.choice_finish_reasons)
                self.terminal = self._out(offset, ev, EventName.DONE, done)
                return self.terminal
            case Failed():
                data = {"code": payload.code, "message": payload.message, "retriable": payload.retriable}
                self.terminal = self._out(offset, ev, EventName.ERROR, data)
                return self.terminal
            case _:
                assert_never(payload)

    def _out(self, offset: int, ev: TokenEvent, name: EventName, data: dict[str, Any]) -> ViewEvent:
        return ViewEvent(offset, name, data, ev.run_id, ev.seq, ev.ts_ms)

    @property
    def run_id(self) -> str | None:
        return self.log.current.run_id if self.log.current is not None else None

    @property
    def text(self) -> str:
        return self.log.current.text if self.log.current is not None else ""

    @property
    def tokens(self) -> int:
        return self.log.current.tokens if self.log.current is not None else 0

    @property
    def model(self) -> str:
        if self.log.started is not None and self.log.started.model:
            return self.log.started.model
        return self.log.accepted.model if self.log.accepted is not None else ""

    @property
    def tenant(self) -> str:
        if self.log.accepted is not None and self.log.accepted.tenant:
            return self.log.accepted.tenant
        return self.log.started.tenant if self.log.started is not None else ""

    @property
    def priority(self) -> str:
        """The request's service class, as its Accepted records it ('interactive' when none is in the log)."""
        return self.log.accepted.priority if self.log.accepted is not None else "interactive"

    @property
    def prompt_tokens(self) -> int:
        return self.log.started.prompt_tokens if self.log.started is not None else 0

    @property
    def known(self) -> bool:
        """Whether any record of the request has been seen (accepted, started or ended)."""
        return self.log.known

    @property
    def status(self) -> str:
        if self.terminal is not None:
            return "done" if self.terminal.event == EventName.DONE else "failed"
        return "running" if self.run_id is not None else "queued"


def logprob_json(lp: TokenLogprob) -> dict[str, Any]:
    """A token's logprob in a ``token`` event: ``token_id``, ``logprob``, ``bytes`` (a list of ints, as OpenAI's) and
    ``top``, the likeliest alternatives in the same form."""
    top = [{"token_id": t.token_id, "logprob": t.logprob, "bytes": list(t.token_bytes)} for t in lp.top]
    return {"token_id": lp.token_id, "logprob": lp.logprob, "bytes": list(lp.token_bytes), "top": top}


def replay(request_id: str, log: Iterable[tuple[int, TokenEvent]]) -> list[ViewEvent]:
    """Every SSE event of a request's log, in order."""
    view = View(request_id)
    return [out for offset, ev in log if (out := view.feed(offset, ev)) is not None]

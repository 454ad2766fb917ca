"""The vocabularies are closed: every consumer of the payload union, and of the SSE event names, handles each one.

mypy lists the places (each matches with ``assert_never``); these tests run each consumer over one example of every
type, so a type added to ``schemas.records.Payload`` without an example here, or without a case in a consumer,
fails here too.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from aiokafka.structs import ConsumerRecord

from gateway.api.openai import AnswerFold
from schemas.codec import default_codec
from schemas.records import (
    PAYLOAD_TYPES,
    Accepted,
    Deleted,
    Delta,
    Failed,
    Finished,
    Payload,
    Started,
    TokenEvent,
    Usage,
    from_avro,
    to_avro,
)
from schemas.runlog import Change, RunLog
from schemas.view import EventName, View, ViewEvent
from services.analytics.aggregate import apply_event, new_partition_state
from services.cli.logtools import PAYLOAD_COLUMNS, export_line, parquet_row, tail_line
from services.cli.submit import print_event

RID = "01890a5d-ac96-774b-bcce-b302099a8057"
NOW = 1_700_000_000_000

# One example of every payload type, with the seq it takes in a run (Accepted has no run).
EXAMPLES: dict[type[Payload], tuple[str, int, Payload]] = {
    Accepted: ("", 0, Accepted("m", tenant="key-1", deadline_ms=NOW + 5_000, background=True, metadata={"a": "b"})),
    Started: ("run1", 0, Started("w1", "m", 7, 3, tenant="key-1")),
    Delta: ("run1", 1, Delta(" hi", (5, 6))),
    Finished: ("run1", 2, Finished("stop", Usage(7, 2), ttft_ms=4, total_ms=9)),
    Failed: ("run1", 2, Failed("deadline_exceeded", "too slow", retriable=True)),
    Deleted: ("", 0, Deleted("key-1")),
}
# What each consumer makes of each type (a new type needs a row in each).
RUNLOG = {Accepted: Change.ACCEPTED, Started: Change.STARTED, Delta: Change.DELTA, Deleted: None}
VIEW = {Accepted: None, Started: EventName.STARTED, Delta: EventName.TOKEN, Finished: EventName.DONE, Deleted: None}
TAIL = {
    Accepted: "accepted model=m",
    Started: "started model=m",
    Delta: 'token " hi"',
    Finished: "done stop",
    Deleted: "deleted tenant=key-1",
}
TERMINAL = {Finished, Failed}


def _event(kind: type[Payload]) -> TokenEvent:
    run_id, seq, payload = EXAMPLES[kind]
    return TokenEvent(RID, run_id, seq, NOW, payload)


def _record(value: bytes, offset: int = 42) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t", 3, offset, NOW, 1, RID.encode(), value, None, len(RID), len(value), [])


def _lead_in(kind: type[Payload]) -> list[TokenEvent]:
    """The events a log holds before one of ``kind`` (a run's events need its Started and the seqs before)."""
    if kind in (Accepted, Started, Deleted):
        return []
    before = [_event(Started)]
    if kind is not Delta:
        before.append(_event(Delta))
    return before


def test_the_examples_cover_the_vocabulary() -> None:
    assert set(EXAMPLES) == set(get_args(Payload)) == set(PAYLOAD_TYPES)
    assert all(type(payload) is kind for kind, (_, _, payload) in EXAMPLES.items())


@pytest.mark.parametrize("kind", PAYLOAD_TYPES, ids=lambda k: k.__name__)
def test_the_codec_round_trips_every_type(kind: type[Payload]) -> None:
    event = _event(kind)
    assert from_avro("TokenEvent", to_avro(event)) == event
    codec = default_codec()
    assert codec.decode_event(codec.encode(event)) == event
    assert event.is_terminal == (kind in TERMINAL)


@pytest.mark.parametrize("kind", PAYLOAD_TYPES, ids=lambda k: k.__name__)
def test_the_run_log_and_the_view_handle_every_type(kind: type[Payload]) -> None:
    runlog, view = RunLog(RID), View(RID)
    for offset, ev in enumerate(_lead_in(kind)):
        runlog.feed(ev)
        view.feed(offset, ev)
    event = _event(kind)
    change = runlog.feed(event)
    assert change == (Change.TERMINAL if kind in TERMINAL else RUNLOG[kind])
    out = view.feed(10, event)
    if kind in TERMINAL:
        assert out is not None and out.terminal and out.event == (EventName.DONE if kind is Finished else "error")
    else:
        assert (out.event if out is not None else None) == VIEW[kind]
        assert view.terminal is None  # no payload but Finished and Failed ends a stream


@pytest.mark.parametrize("kind", PAYLOAD_TYPES, ids=lambda k: k.__name__)
def test_tail_and_export_print_every_type(kind: type[Payload]) -> None:
    raw = default_codec().encode(_event(kind))
    line = tail_line(_record(raw))
    assert line.startswith("2023-11-14T22:13:20.000Z p3@42 " + RID)
    assert TAIL.get(kind, "failed deadline_exceeded: too slow (retriable)") in line
    exported = json.loads(json.dumps(export_line(_record(raw))))
    assert exported["event"]["type"] == kind.__name__
    assert exported["event"]["run_id"] == EXAMPLES[kind][0]
    row = parquet_row(exported)
    assert row["type"] == kind.__name__ and json.loads(row["payload_json"]) == exported["event"]["payload"]


def test_the_parquet_columns_name_every_type() -> None:
    assert set(PAYLOAD_COLUMNS) == {kind.__name__ for kind in PAYLOAD_TYPES}


@pytest.mark.parametrize("end", [Finished, Failed], ids=lambda k: k.__name__)
def test_analytics_counts_a_log_with_every_type(end: type[Payload]) -> None:
    state = new_partition_state()
    info = None
    counted = []
    for offset, kind in enumerate([Accepted, Started, Delta, end]):
        outcome = apply_event(state, info, _event(kind), 3, offset, 60)
        if outcome.request is not None:
            info = outcome.request
        counted.append(outcome.state_changed)
    assert counted == [False, False, False, True]  # only the terminal event moves the aggregates
    row = state["by_model"]["m"]
    assert (row["requests"], row["failed"]) == ((1, 0) if end is Finished else (0, 1))


# The SSE vocabulary (schemas.view.EventName) is closed too: one example of each event's data.
EVENT_DATA: dict[EventName, dict[str, Any]] = {
    EventName.STARTED: {"run_id": "r", "model": "m", "prompt_tokens": 3, "queue_ms": 1},
    EventName.TOKEN: {"seq": 1, "text": " hi", "token_ids": [5]},
    EventName.RESTART: {"run_id": "r2", "text": " hi"},
    EventName.DONE: {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
    EventName.ERROR: {"code": "deadline_exceeded", "message": "too slow", "retriable": False},
    EventName.RESET: {"reason": "retention"},
}


def test_the_event_examples_cover_the_sse_vocabulary() -> None:
    assert set(EVENT_DATA) == set(EventName)


@pytest.mark.parametrize("name", list(EventName))
def test_every_sse_consumer_handles_every_event(name: EventName, capsys: pytest.CaptureFixture[str]) -> None:
    step = AnswerFold("m").feed(name, EVENT_DATA[name])
    assert (step is not None) == (name not in (EventName.STARTED, EventName.RESET))
    code = print_event(ViewEvent(1, name, EVENT_DATA[name], "r", 1, NOW))
    assert code == {EventName.DONE: 0, EventName.ERROR: 1}.get(name)
    capsys.readouterr()

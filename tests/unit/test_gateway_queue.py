"""The edge's view of the queue (QueueBook) and of a request's class (parse_priority); the cheap Accepted check."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.api.validation import PRIORITY_HEADER, parse_priority
from gateway.cluster.queued import UNKNOWN, Depth, Ended, QueueBook
from schemas.codec import AVRO_DIR, DELTA_BRANCH, Codec, default_codec, peek_event, run_id_empty
from schemas.errors import FieldError, RequestRefused, Unsupported
from schemas.records import Accepted, Delta, Failed, Finished, Started, TokenEvent, Usage

R1 = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a51"
R2 = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a52"
R3 = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a53"


def accepted(rid: str, ts: int, *, deadline: int | None = None, priority: str = "interactive") -> TokenEvent:
    return TokenEvent(rid, "", 0, ts, Accepted("m", "k_a", deadline, priority=priority))


def test_waiting_requests_are_counted_per_model_class_and_tenant_until_they_start() -> None:
    book = QueueBook()
    book.feed(0, accepted(R1, 100))
    book.feed(0, accepted(R2, 200, priority="batch"))
    book.feed(1, accepted(R3, 300, priority="batch"))
    assert book.depths() == {("m", "interactive", "k_a"): Depth(1, 100), ("m", "batch", "k_a"): Depth(2, 200)}
    book.feed(0, TokenEvent(R2, "run", 0, 400, Started("w", "m", 5, 10)))
    assert book.depths()[("m", "batch", "k_a")] == Depth(1, 300)


def test_an_ended_request_reports_what_it_used() -> None:
    book = QueueBook()
    book.feed(0, accepted(R1, 100))
    assert book.feed(0, TokenEvent(R1, "run", 0, 110, Started("w", "m", 5, 10))) is None
    book.feed(0, TokenEvent(R1, "run", 1, 120, Delta("a", (1, 2))))
    assert book.feed(0, TokenEvent(R1, "run", 2, 130, Finished("length", Usage(5, 2)))) == Ended(R1, "k_a", 7)
    assert R1 not in book.requests and R1.encode() not in book.keys
    book.feed(0, accepted(R2, 100))
    book.feed(0, TokenEvent(R2, "run", 0, 110, Started("w", "m", 5, 10)))
    assert book.feed(0, TokenEvent(R2, "run", 2, 130, Failed("engine_error", "x"))) == Ended(R2, "k_a", UNKNOWN)
    book.feed(0, accepted(R3, 100))
    assert book.feed(0, TokenEvent(R3, "", 0, 130, Failed("deadline_exceeded", "x"))) == Ended(R3, "k_a", 0)


def test_deadlines_are_due_once_only_while_waiting_and_can_be_looked_at_again() -> None:
    book = QueueBook()
    book.feed(0, accepted(R1, 100, deadline=1000))
    book.feed(0, accepted(R2, 100, deadline=1000))
    book.feed(0, accepted(R3, 100, deadline=5000))
    book.feed(0, TokenEvent(R2, "run", 0, 500, Started("w", "m", 5, 10)))  # started: the worker's to end
    assert book.due(999) == []
    due = book.due(1000)
    assert [w.request_id for w in due] == [R1]
    assert book.due(2000) == []
    book.recheck(due[0], 3000)
    assert [w.request_id for w in book.due(3000)] == [R1]
    book.feed(0, TokenEvent(R1, "", 0, 3100, Failed("deadline_exceeded", "x")))
    book.recheck(due[0], 4000)
    assert book.due(4000) == []  # ended meanwhile


def test_partitions_another_gateway_reads_now_are_forgotten() -> None:
    book = QueueBook()
    book.feed(0, accepted(R1, 100, deadline=1000))
    book.feed(1, accepted(R2, 100, deadline=1000))
    book.drop_partitions({0})
    assert set(book.requests) == {R2}
    assert [w.request_id for w in book.due(1000)] == [R2]


@pytest.mark.parametrize("codec", [default_codec(), Codec(schema_ids={"TokenEvent": 300})])
def test_accepted_records_and_deltas_are_told_apart_without_decoding(codec: Codec) -> None:
    head = peek_event(codec.encode(accepted(R1, 1)))
    assert head is not None and head.run_empty and head.branch == 4
    head = peek_event(codec.encode(TokenEvent(R1, "", 0, 1, Failed("deadline_exceeded", "x"))))
    assert head is not None and head.run_empty and head.branch == 3
    head = peek_event(codec.encode(TokenEvent(R1, "run-1", 7, 1_700_000_000_000, Delta("x", (1,)))))
    assert head is not None and not head.run_empty and head.branch == DELTA_BRANCH
    assert peek_event(b"\x07garbage") is None
    key = R1.encode()
    assert run_id_empty(codec.encode(accepted(R1, 1)), key)
    assert not run_id_empty(codec.encode(TokenEvent(R1, "run-1", 0, 1, Delta("x", (1,)))), key)
    assert not run_id_empty(b"\x07garbage", key)
    long_key = "r" * 80
    assert run_id_empty(codec.encode(TokenEvent(long_key, "", 0, 1, Accepted("m"))), long_key.encode())
    assert peek_event(codec.encode(accepted(R1, 1))[:20]) is None


def test_every_token_event_version_keeps_the_payload_order() -> None:
    for path in sorted(AVRO_DIR.glob("TokenEvent.v*.avsc")):
        payload = next(f for f in json.loads(path.read_text())["fields"] if f["name"] == "payload")
        assert payload["type"][DELTA_BRANCH]["name"] == "Delta", path.name


@pytest.mark.parametrize(
    ("body", "header", "expected"),
    [
        ({}, None, "interactive"),
        ({"priority": "batch"}, None, "batch"),
        ({"service_tier": "flex"}, None, "batch"),
        ({"service_tier": "auto"}, None, "interactive"),
        ({"service_tier": "default"}, "interactive", "interactive"),
        ({}, " Batch ", "batch"),
        ({"priority": "batch", "service_tier": "flex"}, "batch", "batch"),
    ],
)
def test_one_function_decides_the_class(body: dict[str, Any], header: str | None, expected: str) -> None:
    assert parse_priority(body, header) == expected


def test_a_class_asked_for_wrongly_is_refused_with_a_clear_code() -> None:
    with pytest.raises(Unsupported) as tier:
        parse_priority({"service_tier": "priority"}, None)
    assert tier.value.field == "service_tier" and tier.value.http_status == 400
    with pytest.raises(FieldError) as native:
        parse_priority({"priority": "urgent"}, None)
    assert native.value.field == "priority"
    with pytest.raises(Unsupported) as header:
        parse_priority({}, "later")
    assert header.value.field == PRIORITY_HEADER
    with pytest.raises(RequestRefused) as both:
        parse_priority({"service_tier": "flex"}, "interactive")
    assert both.value.code == "priority_conflict"

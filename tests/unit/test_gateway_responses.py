"""The Responses surface without a server: the fold's steps as numbered events, resumable at every number."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from openai._models import construct_type
from openai.types.responses import Response

from gateway.api.openai import AnswerFold, Completed, Surface, follow
from gateway.api.responses import request_id_of_response
from gateway.api.responses_body import parse_create
from gateway.api.responses_events import ResponseEvents, ResponseOptions, response_id
from gateway.fanout.sse import parse
from gateway.fanout.subscription import Subscription, make_out
from schemas.codec import default_codec
from schemas.errors import FieldError, KafkaUnavailable, NotFound
from schemas.ids import new_request_id
from schemas.records import Accepted, Delta, Finished, InferenceRequest, Started, TokenEvent, Usage
from schemas.records import Failed as FailedRecord
from schemas.runlog import RunLog
from schemas.view import EventName, ViewEvent, replay
from services.requests import submit_request
from services.settings import Settings

RID = "01890000-0000-7000-8000-000000000000"


def log(*payloads: tuple[str, int, object]) -> list[tuple[int, TokenEvent]]:
    return [(i, TokenEvent(RID, run, seq, 1000 + i, p)) for i, (run, seq, p) in enumerate(payloads)]  # type: ignore[arg-type]


def events_of(
    records: list[tuple[int, TokenEvent]], after: int = -1, background: bool = True
) -> tuple[ResponseEvents, list[dict[str, Any]]]:
    surface = ResponseEvents(AnswerFold("asked"), RID, ResponseOptions("asked", background), after=after)
    raw = surface.opening() + b"".join(surface.feed(ev) for ev in replay(RID, records))
    parsed = parse(raw.decode())
    for ev in parsed:  # the SSE event name and id repeat the body's type and number
        body = json.loads(ev["data"])
        assert ev["event"] == body["type"] and int(ev["id"]) == body["sequence_number"]
    return surface, [json.loads(ev["data"]) for ev in parsed]


STOPPED = log(
    ("r1", 0, Started("w", "worker-model", 3, 1)),
    ("r1", 1, Delta("Hel", (1,))),
    ("r1", 2, Delta("lo", (2,))),
    ("r1", 3, Finished("stop", Usage(3, 2))),
)


def test_a_completed_response_in_openai_order_numbered_without_gaps() -> None:
    surface, events = events_of(STOPPED)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "queued" and events[0]["response"]["output"] == []
    final = construct_type(type_=Response, value=events[-1]["response"])
    assert isinstance(final, Response)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == final.output_text == "Hello" == events[6]["text"]
    assert final.status == "completed" and final.model == "worker-model" and final.id == response_id(RID)
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (3, 2, 5)
    assert surface.object() == events[-1]["response"]


def test_every_starting_after_resumes_with_exactly_the_rest() -> None:
    _, full = events_of(STOPPED)
    for after in range(-1, len(full) + 3):
        assert events_of(STOPPED, after=after)[1] == full[after + 1 :]


def test_it_is_a_surface_of_the_one_answer_fold() -> None:
    surface: Surface = ResponseEvents(AnswerFold("m"), RID, ResponseOptions("m"))  # mypy checks the protocol
    whole = surface.whole(Completed("stop", {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}))
    assert whole["status"] == "completed" and whole["usage"]["total_tokens"] == 1


def test_a_foreground_response_starts_in_progress() -> None:
    _, events = events_of(STOPPED, background=False)
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["background"] is False


def test_max_tokens_is_incomplete_and_cancel_is_cancelled() -> None:
    _, events = events_of(
        log(("r1", 0, Started("w", "m", 3, 1)), ("r1", 1, Delta("a", (1,))), ("r1", 2, Finished("length", Usage(3, 1))))
    )
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"
    _, events = events_of(
        log(
            ("r1", 0, Started("w", "m", 3, 1)),
            ("r1", 1, Delta("a", (1,))),
            ("r1", 2, Finished("cancelled", Usage(3, 1))),
        )
    )
    assert events[-1]["type"] == "response.cancelled" and events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "a"


def test_cancelled_before_any_worker_started_has_no_output_item() -> None:
    _, events = events_of(log(("r1", 0, Finished("cancelled", Usage(0, 0)))))
    assert [e["type"] for e in events] == ["response.created", "response.cancelled"]
    assert events[-1]["response"]["output"] == []


def test_errors_fail_the_response_with_their_code() -> None:
    _, events = events_of(
        log(("r1", 0, Started("w", "m", 3, 1)), ("r1", 1, FailedRecord("context_overflow", "too long", False)))
    )
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "context_overflow", "message": "too long"}
    assert events[-1]["response"]["usage"] is None


def test_restarts_continue_seamlessly_or_fail_what_cannot_be_taken_back() -> None:
    _, kept = events_of(
        log(
            ("r1", 0, Started("w", "m", 3, 1)),
            ("r1", 1, Delta("ab", (1,))),
            ("r2", 0, Started("w", "m", 3, 1, "", None, 2, "abc")),
            ("r2", 1, Finished("stop", Usage(3, 3))),
        )
    )
    assert "".join(e.get("delta", "") for e in kept) == "abc" and kept[-1]["type"] == "response.completed"
    surface, rewritten = events_of(
        log(
            ("r1", 0, Started("w", "m", 3, 1)),
            ("r1", 1, Delta("ab", (1,))),
            ("r2", 0, Started("w", "m", 3, 1, "", None, 1, "x")),
            ("r2", 1, Finished("stop", Usage(3, 1))),
        )
    )
    assert rewritten[-1]["type"] == "response.failed" and rewritten[-1]["response"]["error"]["code"] == "restarted"
    assert surface.ended and surface.object()["status"] == "failed"


def test_response_ids_map_back_without_state() -> None:
    fresh = new_request_id()
    assert request_id_of_response(response_id(RID)) == RID and request_id_of_response(response_id(fresh)) == fresh
    upper = "resp_" + response_id(fresh)[5:].upper()
    future = response_id(new_request_id(int(time.time() * 1000) + 3_600_000))
    for bad in ("", RID, fresh, "resp_" + "0" * 32, "resp_xyz", upper, future, "msg_" + response_id(fresh)[5:]):
        with pytest.raises(NotFound):
            request_id_of_response(bad)


def test_create_bodies_in_and_refused() -> None:
    spec = parse_create({"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 5}, 64)
    assert [(m.role, m.content) for m in spec.messages] == [("system", "be brief"), ("user", "hi")]
    assert spec.sampling.max_tokens == 5 and spec.store and not spec.background and not spec.stream
    listed = parse_create(
        {
            "input": [
                {"role": "developer", "content": "rules"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
            ],
            "tools": [],
            "tool_choice": "auto",
            "text": {"format": {"type": "text"}},
            "metadata": {"k": "v"},
            "user": "someone",
        },
        64,
    )
    assert [m.role for m in listed.messages] == ["system", "user", "assistant"]
    assert listed.metadata == {"k": "v"} and listed.sampling.max_tokens == 64
    # Tools, their outputs and structured text formats are taken (tests/unit/test_structured.py checks them).
    tooled = parse_create(
        {
            "input": [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "o"},
            ],
            "tools": [{"type": "function", "name": "f"}],
            "text": {"format": {"type": "json_object"}},
        },
        64,
    )
    assert [(m.role, m.tool_call_id, m.name) for m in tooled.messages] == [
        ("assistant", None, None),
        ("tool", "c", "f"),
    ]
    assert tooled.sampling.tools and tooled.sampling.response_format
    refused: list[dict[str, Any]] = [
        {"input": "x", "tools": [{"type": "web_search"}]},
        {"input": "x", "reasoning": {"effort": "high"}},
        {"input": "x", "include": ["reasoning.encrypted_content"]},
        {"input": "x", "conversation": "conv_1"},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
        {"input": "x", "frobnicate": 1},
        {"input": "x", "background": True, "store": False},
    ]
    for body in refused:
        with pytest.raises(FieldError) as caught:  # Unsupported, or InvalidParameter for a tool type
            parse_create(body, 64)
        assert caught.value.http_status == 400
    for body in ({"input": "x", "top_logprobs": 21}, {"input": "x", "previous_response_id": 7}):
        with pytest.raises(FieldError):
            parse_create(body, 64)
    with pytest.raises(FieldError) as bad:
        parse_create({"input": "x", "max_output_tokens": 100}, 64)
    assert bad.value.field == "max_output_tokens"
    for body in ({}, {"input": []}, {"input": "x", "stream": "yes"}, {"input": "x", "metadata": {"k": 1}}):
        with pytest.raises(FieldError):
            parse_create(body, 64)


def test_the_create_body_asks_for_logprobs_and_names_what_the_object_echoes() -> None:
    spec = parse_create(
        {
            "input": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "instructions": "be brief",
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 3,
            "temperature": 0,
            "max_output_tokens": 9,
            "previous_response_id": "resp_x",
        },
        64,
    )
    assert spec.sampling.logprobs and spec.sampling.top_logprobs == 3
    assert spec.echo == {
        "instructions": "be brief",
        "temperature": 0.0,
        "top_p": 1.0,
        "max_output_tokens": 9,
        "top_logprobs": 3,
        "previous_response_id": "resp_x",
        "text": {"format": {"type": "text"}},
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": False,
    }
    assert [(i["role"], i["content"][0]["type"]) for i in spec.items] == [
        ("user", "input_text"),
        ("assistant", "output_text"),
    ]
    earlier = [{"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "first"}]}]
    turns = [(m.role, m.content) for m in spec.conversation(earlier)]
    assert turns == [("system", "be brief"), ("user", "first"), ("user", "q"), ("assistant", "a")]
    assert parse_create({"input": "x", "top_logprobs": 2}, 64).sampling.logprobs  # top_logprobs alone asks too
    assert not parse_create({"input": "x"}, 64).sampling.logprobs


def test_a_connection_error_takes_the_next_number_without_consuming_it() -> None:
    surface = ResponseEvents(AnswerFold("asked"), RID, ResponseOptions("asked"))
    surface.opening()
    (event,) = parse(surface.connection_error("too_slow", "the client did not keep up").decode())
    body = json.loads(event["data"])
    assert event["event"] == "error" and "id" not in event
    assert (body["type"], body["sequence_number"], body["code"]) == ("error", 1, "too_slow") and surface.seq == 1


class Recorder:
    """A producer that records what it is sent, and fails sends to one topic."""

    def __init__(self, fail_topic: str = ""):
        self.fail_topic = fail_topic
        self.sent: list[tuple[str, object]] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: Any = None) -> None:
        if topic == self.fail_topic:
            raise KafkaUnavailable("down")
        self.sent.append((topic, default_codec().decode(value)))


async def test_a_responses_submit_records_its_options_before_the_request_and_ends_what_was_not_submitted() -> None:
    settings = Settings()
    request = InferenceRequest(new_request_id(), "p", 4, model="default")
    accepted = Accepted("default", "t", None, True, True, {"k": "v"})
    producer = Recorder()
    await submit_request(producer, settings, default_codec(), request, accepted)
    assert [topic for topic, _ in producer.sent] == [settings.events_topic, settings.requests_topic_for("default")]
    first = producer.sent[0][1]
    assert isinstance(first, TokenEvent) and first.payload == accepted
    failing = Recorder(fail_topic=settings.requests_topic_for("default"))
    with pytest.raises(KafkaUnavailable):
        await submit_request(failing, settings, default_codec(), request, accepted)
    ended = [record for _, record in failing.sent]
    assert [type(e.payload).__name__ for e in ended if isinstance(e, TokenEvent)] == ["Accepted", "Failed"]


class Abandoning(Recorder):
    """A producer whose first send to one topic is given up on (a timeout) although the record is still delivered."""

    def __init__(self, topic: str):
        super().__init__()
        self.topic = topic
        self.abandoned = False

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: Any = None) -> None:
        await super().send_and_wait(topic, value, key, headers)
        if topic == self.topic and not self.abandoned:
            self.abandoned = True
            raise TimeoutError


async def test_an_accepted_record_given_up_on_but_delivered_is_followed_by_the_requests_end() -> None:
    # Found by the chaos run (bench/chaos.py): during a whole-cluster outage a Responses submit timed out on its
    # Accepted record, answered 503, and the record landed when the brokers came back: a request that never ended.
    settings = Settings()
    request = InferenceRequest(new_request_id(), "p", 4, model="default")
    producer = Abandoning(settings.events_topic)
    with pytest.raises(TimeoutError):
        await submit_request(producer, settings, default_codec(), request, Accepted("default", "t", None, True))
    assert [topic for topic, _ in producer.sent] == [settings.events_topic, settings.events_topic]
    log = RunLog(request.request_id)
    for _, record in producer.sent:
        assert isinstance(record, TokenEvent)
        log.feed(record)
    assert log.terminal is not None and isinstance(log.terminal.payload, FailedRecord)


async def test_an_idle_follow_calls_its_keepalive_until_the_next_event() -> None:
    """Responses streams send a keep-alive comment when idle: ``follow`` awaits ``idle`` between events."""
    sub = Subscription(RID, -1, 8)
    request: Any = SimpleNamespace(transport=SimpleNamespace(is_closing=lambda: False))
    idled = asyncio.Event()

    async def idle() -> None:
        idled.set()

    async def end_later() -> None:
        await asyncio.wait_for(idled.wait(), 30)
        done = ViewEvent(5, EventName.DONE, {"finish_reason": "stop", "usage": {}}, "r", 1, 0)
        sub.offer(make_out(0, RID, done))

    ender = asyncio.create_task(end_later())
    events = [ev async for ev in follow(request, sub, idle, idle_s=0.0)]
    await ender
    assert idled.is_set() and [ev.event for ev in events if ev is not None] == [EventName.DONE]

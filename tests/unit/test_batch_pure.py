"""The Batch API's pure parts: line ids, input-file checks with line numbers, object shapes, line answers."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from openai.types import Batch, FileObject

from gateway.api.openai import AnswerFold, Completions, completion_request
from gateway.batch.answers import LineRecord, LineResult, line_result
from gateway.batch.driver import BatchRun
from gateway.batch.handlers import page_after
from gateway.batch.lines import parse_lines
from gateway.batch.objects import (
    CANCELLING,
    COMPLETED,
    BatchState,
    FileMeta,
    batch_uuid,
    error_line,
    line_request_id,
    new_batch_id,
    output_line,
    page,
)
from gateway.batch.tracker import Line
from schemas.errors import FieldError, NotFound, TokenRelayError
from schemas.ids import parse_request_id, request_id_time_ms
from schemas.records import Delta, Failed, Finished, InferenceRequest, Started, TokenEvent, Usage
from schemas.view import replay
from services.cli.batch import endpoint_of

NOW_MS = 1_796_000_000_000


def test_a_line_s_request_id_is_a_uuidv7_of_the_batch_s_time_the_same_every_time() -> None:
    batch = new_batch_id(NOW_MS)
    first = line_request_id(batch, 1, NOW_MS)
    parse_request_id(first)
    assert request_id_time_ms(first) == NOW_MS
    assert first == line_request_id(batch, 1, NOW_MS)
    ids = {line_request_id(batch, i, NOW_MS) for i in range(1, 5001)}
    assert len(ids) == 5000
    assert first != line_request_id(new_batch_id(NOW_MS), 1, NOW_MS)


def test_batch_ids_carry_a_uuid() -> None:
    batch = new_batch_id(NOW_MS)
    assert batch.startswith("batch_") and request_id_time_ms(batch_uuid(batch)) == NOW_MS
    for bad in ("batch_xyz", "file-" + batch[6:], batch.upper().replace("BATCH_", "batch_"), batch + "0"):
        with pytest.raises(ValueError):
            batch_uuid(bad)


def line(custom_id: str = "a", url: str = "/v1/completions", **body: Any) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or {"prompt": "p"}}).encode()


def check(url: str, body: dict[str, Any]) -> object:
    if body.get("max_tokens") == -1:
        raise FieldError("max_tokens", "must be between 1 and 4096")
    if body.get("model") == "nope":
        raise NotFound("no model 'nope'", code="model_not_found")
    return None


def test_every_bad_line_is_named_by_its_number_blank_lines_keep_theirs() -> None:
    data = b"\n".join(
        [
            line("a"),
            b"",
            b"{not json",
            b"[1]",
            line("a"),
            json.dumps({"custom_id": "m", "method": "GET", "url": "/v1/completions", "body": {}}).encode(),
            line("u", url="/v1/embeddings"),
            line("b", max_tokens=-1),
            line("s", stream=True),
            line("n", model="nope"),
            line("c"),
            json.dumps({"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {}}).encode(),
            b"",
        ]
    )
    lines, errors = parse_lines(data, 100, check)
    assert [(x.line, x.custom_id) for x in lines] == [(1, "a"), (11, "c")]
    assert [(e.line, e.code, e.param) for e in errors] == [
        (3, "invalid_json_line", None),
        (4, "invalid_json_line", None),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "invalid_method", "method"),
        (7, "invalid_url", "url"),
        (8, "invalid_field", "body.max_tokens"),
        (9, "unsupported_parameter", "body.stream"),
        (10, "model_not_found", None),
        (12, "invalid_custom_id", "custom_id"),
    ]
    assert str(errors[5]) == "line 8: max_tokens: must be between 1 and 4096"
    assert errors[0].as_openai() == {
        "code": "invalid_json_line",
        "message": errors[0].message,
        "param": None,
        "line": 3,
    }


def test_a_batch_s_endpoint_and_line_limit_are_checked() -> None:
    data = b"\n".join([line("a"), line("b", url="/v1/chat/completions"), line("c"), line("d")])
    lines, errors = parse_lines(data, 3, check, endpoint="/v1/completions")
    assert [x.custom_id for x in lines] == ["a", "c"]
    assert [(e.line, e.code) for e in errors] == [(2, "mismatched_endpoint"), (4, "too_many_lines")]


def test_the_batch_object_has_openai_s_shape_and_shows_a_pending_cancel() -> None:
    state = BatchState(
        "batch_x", "k", "/v1/chat/completions", "file-x", "24h", 100, 100_000, 86_500, metadata={"a": "b"}, total=3
    )
    shown = Batch.model_validate(state.as_openai())
    assert shown.status == "validating" and shown.request_counts is not None and shown.request_counts.total == 3
    pending = Batch.model_validate(state.as_openai(cancelling_at=120))
    assert (pending.status, pending.cancelling_at) == (CANCELLING, 120)
    state.status = COMPLETED
    assert state.as_openai(cancelling_at=120)["status"] == COMPLETED  # too late to cancel
    assert BatchState.from_json(state.to_json()) == state
    assert "tenant" not in state.as_openai() and "submitted" not in state.as_openai()
    meta = FileMeta("file-x", "k", "in.jsonl", "batch", 10, 100, 200, lines=2, offsets=[4, 5])
    assert FileObject.model_validate(meta.as_openai()).bytes == 10
    assert FileMeta.from_json(meta.to_json()) == meta


def test_output_and_error_lines_and_pages() -> None:
    rid = line_request_id(new_batch_id(NOW_MS), 1, NOW_MS)
    out = output_line(rid, "c1", 200, {"x": 1})
    assert out["id"].startswith("batch_req_") and out["response"]["request_id"] == rid and out["error"] is None
    err = error_line(rid, "c1", "batch_expired", "m")
    assert err["response"] is None and err["error"] == {"code": "batch_expired", "message": "m"}
    assert page([{"id": "a"}, {"id": "b"}], 2, True) == {
        "object": "list",
        "data": [{"id": "a"}, {"id": "b"}],
        "first_id": "a",
        "last_id": "b",
        "has_more": True,
    }


RID = "01890000-0000-7000-8000-000000000000"


def view_events(*payloads: object) -> list[Any]:
    records = [(i, TokenEvent(RID, "r1", i, 1000 + i, p)) for i, p in enumerate(payloads)]  # type: ignore[arg-type]
    return replay(RID, records)


def test_a_line_s_body_is_what_the_endpoint_answers_whole() -> None:
    events = view_events(
        Started("w", "m", 3, 1), Delta("Hi", (1,)), Delta(" there", (2,)), Finished("stop", Usage(3, 2))
    )
    result = line_result("/v1/chat/completions", RID, "m", None, events)
    fold = AnswerFold("m")
    whole = Completions(fold, RID, True)
    for ev in events:
        fold.feed(ev.event, ev.data)
    expected = whole.whole(fold.feed(events[-1].event, events[-1].data))  # type: ignore[arg-type]
    assert result.status_code == 200 and not result.cancelled
    assert {k: v for k, v in result.body.items() if k != "created"} == {
        k: v for k, v in expected.items() if k != "created"
    }
    assert result.body["choices"][0]["message"]["content"] == "Hi there"
    assert (result.prompt_tokens, result.completion_tokens) == (3, 2)

    response = line_result("/v1/responses", RID, "m", None, events)
    assert response.body["object"] == "response" and response.body["status"] == "completed"
    assert response.body["output"][0]["content"][0]["text"] == "Hi there"
    text = line_result("/v1/completions", RID, "m", None, events)
    assert text.body["object"] == "text_completion" and text.body["choices"][0]["text"] == "Hi there"


def test_a_failed_line_answers_the_endpoint_s_error_and_a_cancelled_one_says_so() -> None:
    refused = line_result("/v1/completions", RID, "m", None, view_events(Failed("prompt_too_long", "too long")))
    assert refused.status_code == 400
    assert refused.body == {"error": {"code": "prompt_too_long", "message": "too long"}}
    broken = line_result(
        "/v1/responses", RID, "m", None, view_events(Started("w", "m", 3, 1), Failed("engine_error", "boom"))
    )
    assert broken.status_code == 502 and broken.body["error"]["code"] == "engine_error"
    cancelled = line_result(
        "/v1/chat/completions", RID, "m", None, view_events(Started("w", "m", 3, 1), Finished("cancelled", Usage(3, 0)))
    )
    assert cancelled.cancelled


def test_the_completions_record_function_is_the_endpoint_s() -> None:
    # The Batch API checks lines with the very function the endpoint runs (no copy to drift from it).
    from gateway.batch import answers

    assert answers.openai.completion_request is completion_request


def test_lists_page_after_an_id() -> None:
    items = [{"id": f"b{i}"} for i in range(5)]
    assert page_after({}, items, 2, 100) == (items[:2], True)
    assert page_after({"after": "b1", "limit": "2"}, items, 20, 100) == (items[2:4], True)
    assert page_after({"after": "b3"}, items, 20, 100) == (items[4:], False)
    assert page_after({"after": "unknown"}, items, 20, 100) == ([], False)
    for bad in ("0", "101", "x"):
        with pytest.raises(FieldError):
            page_after({"limit": bad}, items, 20, 100)


def test_the_command_line_takes_the_endpoint_from_the_first_line() -> None:
    data = b"\n" + line("a", url="/v1/responses") + b"\n" + line("b")
    assert endpoint_of("f.jsonl", data) == "/v1/responses"
    with pytest.raises(TokenRelayError, match=r"f\.jsonl"):
        endpoint_of("f.jsonl", b"not json\n")


class FakeStore:
    """What a batch run writes, kept in lists."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[FileMeta, bytes]] = {}
        self.states: list[BatchState] = []
        self.cancels: dict[str, int] = {}

    async def save_file(self, meta: FileMeta, data: bytes) -> FileMeta:
        self.files[meta.id] = (meta, data)
        return meta

    async def put_batch(self, state: BatchState) -> None:
        self.states.append(BatchState.from_json(state.to_json()))


def finished_run(status_of_lines: list[LineResult | None]) -> tuple[BatchRun, FakeStore]:
    from types import SimpleNamespace

    from services.settings import Settings

    store = FakeStore()
    batch_id = new_batch_id(NOW_MS)
    state = BatchState(batch_id, "k", "/v1/completions", "file-x", "24h", NOW_MS // 1000, NOW_MS, NOW_MS // 1000 + 9)
    state.status, state.total, state.submitted = "in_progress", len(status_of_lines), len(status_of_lines)
    run = BatchRun(cast(Any, SimpleNamespace(settings=Settings())), cast(Any, store), state)
    for i, result in enumerate(status_of_lines, 1):
        rid = line_request_id(batch_id, i, NOW_MS)
        record = LineRecord(InferenceRequest(rid, "p", 4), None)
        run.lines.append(Line(i, f"c{i}", "/v1/completions", record, result))
    return run, store


OK = LineResult(200, {"choices": []}, 3, 4)
REFUSED = LineResult(400, {"error": {"code": "prompt_too_long", "message": "m"}}, 0, 0)
STOPPED = LineResult(200, {"choices": []}, 3, 1, cancelled=True)


async def test_a_completed_batch_writes_answers_to_the_output_and_refusals_to_the_error_file() -> None:
    run, store = finished_run([OK, REFUSED, OK])
    await run._finish("completed")
    assert [s.status for s in store.states] == ["finalizing", "completed"]
    final = store.states[-1]
    assert (final.completed, final.failed, final.usage) == (2, 1, {"input_tokens": 6, "output_tokens": 8})
    assert final.output_file_id and final.error_file_id and final.completed_at
    output = [json.loads(x) for x in store.files[final.output_file_id][1].splitlines()]
    errors = [json.loads(x) for x in store.files[final.error_file_id][1].splitlines()]
    assert [o["custom_id"] for o in output] == ["c1", "c3"]
    assert errors[0]["custom_id"] == "c2" and errors[0]["response"]["status_code"] == 400
    assert store.files[final.output_file_id][0].purpose == "batch_output"


@pytest.mark.parametrize(("status", "code"), [("cancelled", "batch_cancelled"), ("expired", "batch_expired")])
async def test_a_batch_cut_short_keeps_its_finished_lines_and_lists_the_rest(status: str, code: str) -> None:
    run, store = finished_run([OK, STOPPED, None])
    await run._finish(status)
    final = store.states[-1]
    assert final.status == status and [s.status for s in store.states] == [status]
    assert (final.cancelled_at is not None, final.expired_at is not None) == (
        status == "cancelled",
        status == "expired",
    )
    assert final.output_file_id is not None and final.error_file_id is not None
    output = [json.loads(x) for x in store.files[final.output_file_id][1].splitlines()]
    errors = [json.loads(x) for x in store.files[final.error_file_id][1].splitlines()]
    assert [o["custom_id"] for o in output] == ["c1"]
    assert [(e["custom_id"], e["error"]["code"], e["response"]) for e in errors] == [
        ("c2", code, None),
        ("c3", code, None),
    ]

"""Each project error becomes one HTTP answer, rendered in one place; the page knows the stream's event names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway.http.app import render_error
from schemas.errors import (
    BodyError,
    BodyTooLarge,
    ClientClosed,
    Conflict,
    CursorError,
    FieldError,
    GenerationFailed,
    KafkaUnavailable,
    NotFound,
    QueueFull,
    TokenRelayError,
    Unauthorized,
    ValidationError,
)
from schemas.view import EventName

PAGE = Path(__file__).resolve().parents[2] / "gateway" / "http" / "static" / "index.html"


@pytest.mark.parametrize(
    ("error", "status", "code", "headers"),
    [
        (BodyError("not JSON"), 400, "invalid_json", {}),
        (CursorError("bad"), 400, "bad_cursor", {}),
        (Unauthorized("a key"), 401, "unauthorized", {"WWW-Authenticate": "Bearer"}),
        (NotFound("no request"), 404, "not_found", {}),
        (Conflict("finished"), 409, "conflict", {}),
        (BodyTooLarge("big"), 413, "body_too_large", {}),
        (ValidationError("rule"), 422, "invalid", {}),
        (QueueFull("9 waiting"), 429, "queue_full", {"Retry-After": "2"}),
        (ClientClosed("gone"), 499, "client_closed", {}),
        (TokenRelayError("oops"), 500, "internal_error", {}),
        (GenerationFailed("it broke", code="boom"), 502, "boom", {}),
        (KafkaUnavailable("no broker"), 503, "kafka_unavailable", {"Retry-After": "1"}),
    ],
)
def test_one_answer_per_error(error: TokenRelayError, status: int, code: str, headers: dict[str, str]) -> None:
    response = render_error(error)
    assert response.status == status
    assert response.text is not None
    body = json.loads(response.text)
    assert body["error"]["code"] == code and body["error"]["message"]
    for name, value in headers.items():
        assert response.headers[name] == value


def test_field_error_names_its_field_and_broker_errors_stay_inside() -> None:
    body = json.loads(render_error(FieldError("top_p", "must be between 0 and 1")).text or "")
    assert body["error"] == {"code": "invalid_field", "message": "top_p: must be between 0 and 1", "field": "top_p"}
    body = json.loads(render_error(KafkaUnavailable("10.0.0.7:9092 refused")).text or "")
    assert "10.0.0.7" not in body["error"]["message"]


def test_page_event_names_are_the_gateways() -> None:
    match = re.search(r"const EVENT = \{([^}]*)\};", PAGE.read_text())
    assert match is not None
    page = dict(re.findall(r'(\w+): "([^"]*)"', match.group(1)))
    assert page == {name.name: name.value for name in EventName}

"""TOKENRELAY_LOG_FORMAT=json: one JSON object a line, with the request and trace a line is about."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from schemas.errors import ConfigError
from services.logs import (
    FORMAT,
    REQUEST_ID,
    JsonFormatter,
    RepeatLimit,
    adopt_handlers,
    bind_request,
    configure_logging,
    request_context,
)
from services.settings import Settings

RID = "01890a5d-ac96-774b-bcce-b302099a8057"


class Capture:
    """A logger of its own writing through one handler to a string."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)
        self.logger = logging.getLogger(f"tokenrelay.test.{id(self)}")
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def close(self) -> None:
        self.logger.removeHandler(self.handler)


@pytest.fixture
def capture() -> Iterator[Capture]:
    c = Capture(JsonFormatter(trace_id=lambda: None))
    yield c
    c.close()


def test_a_line_is_one_json_object_with_time_level_logger_message(capture: Capture) -> None:
    capture.logger.warning("request %s: %d tokens, text %r", "x", 3, 'a "quoted"\nline')
    raw = capture.stream.getvalue()
    assert raw.count("\n") == 1  # the message's newline is escaped inside the one line
    (line,) = capture.lines()
    assert line["level"] == "WARNING"
    assert line["logger"] == capture.logger.name
    assert line["message"] == "request x: 3 tokens, text 'a \"quoted\"\\nline'"
    assert line["time"].endswith("Z") and "T" in line["time"] and len(line["time"]) == len("2026-12-03T14:00:00.000Z")
    assert "request_id" not in line and "trace_id" not in line and "exception" not in line


def test_request_id_comes_from_the_context_or_from_extra(capture: Capture) -> None:
    with request_context(RID):
        capture.logger.info("inside")
    capture.logger.info("outside")
    capture.logger.info("named", extra={"request_id": "other"})
    inside, outside, named = capture.lines()
    assert inside["request_id"] == RID
    assert "request_id" not in outside
    assert named["request_id"] == "other"
    assert REQUEST_ID.get() is None


def test_trace_id_when_a_span_is_active_and_nothing_otherwise() -> None:
    current: list[str | None] = [None]
    c = Capture(JsonFormatter(trace_id=lambda: current[0]))
    try:
        c.logger.info("no span")
        current[0] = "4bf92f3577b34da6a3ce929d0e0e4736"
        c.logger.info("in a span")
    finally:
        c.close()
    no_span, in_span = c.lines()
    assert "trace_id" not in no_span
    assert in_span["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_trace_id_of_opentelemetry_s_current_span() -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    context = trace.SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7, is_remote=False
    )
    c = Capture(JsonFormatter())
    try:
        c.logger.info("no span")
        with trace.use_span(trace.NonRecordingSpan(context)):
            c.logger.info("in a span")
        with trace.use_span(trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)):
            c.logger.info("invalid span")
    finally:
        c.close()
    no_span, in_span, invalid = c.lines()
    assert "trace_id" not in no_span and "trace_id" not in invalid
    assert in_span["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_exception_info_is_one_field_of_the_one_line(capture: Capture) -> None:
    try:
        raise ValueError("broken prompt")
    except ValueError:
        capture.logger.exception("preparing failed")
    capture.logger.info("with a stack", stack_info=True)
    failed, stacked = capture.lines()
    assert failed["level"] == "ERROR" and failed["message"] == "preparing failed"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].rstrip().endswith("ValueError: broken prompt")
    assert stacked["stack"].startswith("Stack (most recent call last):")


async def test_concurrent_tasks_log_their_own_request(capture: Capture) -> None:
    """Each asyncio task has its own copy of the context: interleaved tasks never see each other's request id."""
    both_bound = asyncio.Barrier(3)

    async def work(request_id: str) -> None:
        bind_request(request_id)
        await both_bound.wait()  # the other task has bound its id by now
        for step in range(3):
            capture.logger.info("step %d", step)
            await asyncio.sleep(0)

    async with asyncio.timeout(10):
        first = asyncio.create_task(work("req-a"))
        second = asyncio.create_task(work("req-b"))
        await both_bound.wait()
        await asyncio.gather(first, second)
    capture.logger.info("after")
    lines = capture.lines()
    assert len(lines) == 7
    by_request: dict[str | None, list[str]] = {}
    for line in lines:
        by_request.setdefault(line.get("request_id"), []).append(line["message"])
    assert by_request == {
        "req-a": ["step 0", "step 1", "step 2"],
        "req-b": ["step 0", "step 1", "step 2"],
        None: ["after"],
    }
    assert [line.get("request_id") for line in lines[:6]] != ["req-a"] * 3 + ["req-b"] * 3  # they did interleave


def test_the_setting_names_its_variable_and_refuses_other_formats() -> None:
    assert Settings.from_env({"TOKENRELAY_LOG_FORMAT": "json"}).log_format == "json"
    assert Settings.from_env({}).log_format == "text"
    with pytest.raises(ConfigError, match="TOKENRELAY_LOG_FORMAT"):
        Settings.from_env({"TOKENRELAY_LOG_FORMAT": "xml"})


@contextlib.contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without handlers (as in a fresh process; pytest's own are back afterwards)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    yield root
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.mark.parametrize(
    ("log_format", "check"),
    [
        ("json", lambda text: json.loads(text)["message"] == "hello" and json.loads(text)["request_id"] == RID),
        ("text", lambda text: text.split(" ", 2)[2] == "INFO tokenrelay.setup: hello\n"),
    ],
)
def test_configure_logging_sets_the_format_and_level(log_format: str, check: Callable[[str], bool]) -> None:
    stream = io.StringIO()
    with bare_root() as root:
        configure_logging(Settings(log_format=log_format), "info", stream)
        with request_context(RID):
            logging.getLogger("tokenrelay.setup").info("hello")
            logging.getLogger("tokenrelay.setup").debug("not at INFO")
        assert root.level == logging.INFO
        assert any(isinstance(f, RepeatLimit) for f in root.handlers[0].filters)
    assert check(stream.getvalue()), stream.getvalue()


def test_adopting_a_library_s_handlers() -> None:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(FORMAT))
    adopt_handlers(Settings(log_format="json"), [handler])
    assert isinstance(handler.formatter, JsonFormatter)
    assert sum(isinstance(f, RepeatLimit) for f in handler.filters) == 1
    kept = logging.StreamHandler(io.StringIO())
    text = logging.Formatter("%(message)s")
    kept.setFormatter(text)
    adopt_handlers(Settings(), [kept])
    assert kept.formatter is text  # text logs keep the library's own format


def test_without_the_opentelemetry_api_lines_have_no_trace_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # what an import finds when it is not installed
    c = Capture(JsonFormatter())
    try:
        c.logger.info("plain")
    finally:
        c.close()
    (line,) = c.lines()
    assert "trace_id" not in line and line["message"] == "plain"

"""Logging for every component: one setup (text or JSON lines), the request a log line is about, and one filter
that logs a repeated warning once per interval, counted.

A broker outage made aiokafka log ~734,000 ERROR lines in 63 s (`Unable connect to node`, `Unable to update
metadata`), and analytics logged one WARNING per undecodable record. Repeats are told apart by logger, level and
message template (before its arguments), so "node 1" and "node 2" are the same message.

JSON lines carry ``request_id`` from a context variable that the code doing one request's work sets
(``request_context``, ``bind_request``), and ``trace_id`` from OpenTelemetry's current span when the OpenTelemetry API
is installed and a span is active: a line joins the request's events in Kafka and its trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from services.settings import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REPEAT_INTERVAL_S = 10.0
MAX_MESSAGES = 1024  # templates remembered at most (the least recently logged is forgotten)

_Key = tuple[str, int, str]


@dataclass(slots=True)
class _Window:
    since: float
    suppressed: int = 0


class RepeatLimit(logging.Filter):
    """Passes the first warning (or error) of each message template per ``interval_s``; the next one that passes
    says how many were held back meanwhile. Info and debug records pass untouched."""

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._windows: OrderedDict[_Key, _Window] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.since < self.interval_s:
            window.suppressed += 1
            return False
        if window is not None and window.suppressed:
            record.msg = f"{record.msg} [{window.suppressed} more like this in the last {now - window.since:.0f} s]"
        self._windows[key] = _Window(now)
        self._windows.move_to_end(key)
        while len(self._windows) > MAX_MESSAGES:
            self._windows.popitem(last=False)
        return True


def limit_repeats(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Put one RepeatLimit on each of ``handlers`` (the root logger's when None) that has none yet."""
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        if not any(isinstance(f, RepeatLimit) for f in handler.filters):
            handler.addFilter(RepeatLimit())


# The request whose work the running code does (None: no one request's). Each asyncio task has its own copy.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokenrelay_request_id", default=None)


def bind_request(request_id: str | None) -> contextvars.Token[str | None]:
    """Log the rest of the current task's (or scope's) lines with ``request_id``."""
    return REQUEST_ID.set(request_id)


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Log the lines of this block with ``request_id``; the value before it is back afterwards."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def _no_trace() -> str | None:
    return None


def _trace_reader() -> Callable[[], str | None]:
    """Reads the current OpenTelemetry trace id as 32 hex digits; a reader of nothing without the OpenTelemetry API."""
    try:
        from opentelemetry import trace
    except ImportError:
        return _no_trace

    def current() -> str | None:
        context = trace.get_current_span().get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    return current


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601, ms), level, logger, message, request_id and trace_id when
    known, and the exception's traceback (``exception``) or the stack (``stack``) when the call gave one."""

    def __init__(self, trace_id: Callable[[], str | None] | None = None) -> None:
        super().__init__()
        self.trace_id = trace_id or _trace_reader()

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line: dict[str, object] = {
            "time": when,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # A line about a request the code does not run in (a fan-out loop, a consumer) names it with extra=.
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        trace_id = self.trace_id()
        if trace_id:
            line["trace_id"] = trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of TOKENRELAY_LOG_FORMAT's value ('text' or 'json')."""
    return JsonFormatter() if log_format.lower() == "json" else logging.Formatter(FORMAT)


def adopt_handlers(settings: Settings, handlers: Iterable[logging.Handler] | None = None) -> None:
    """Make handlers a library set up (faust's) write our lines: the JSON format when configured, repeats limited."""
    handlers = list(logging.getLogger().handlers if handlers is None else handlers)
    if settings.log_format.lower() == "json":
        for handler in handlers:
            handler.setFormatter(JsonFormatter())
    limit_repeats(handlers)


def configure_logging(settings: Settings, level: str | None = None, stream: TextIO | None = None) -> None:
    """The logging of a tokenrelay process: its level (``level`` or TOKENRELAY_LOG_LEVEL), its format
    (TOKENRELAY_LOG_FORMAT), repeats limited. Like ``logging.basicConfig``, a process whose root logger has handlers
    already keeps them."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(formatter(settings.log_format))
        root.addHandler(handler)
        root.setLevel((level or settings.log_level).upper())
    limit_repeats()

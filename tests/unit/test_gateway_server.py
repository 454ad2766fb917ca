"""The HTTP listener's pure parts: the connection cap against the fd limit, rate-limited accept errors, raw answers."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from gateway.http.server import REFUSED, AcceptErrorLog, connection_cap


def test_connection_cap_stays_below_the_fd_limit() -> None:
    assert connection_cap(16_384, 20_000) == 16_384
    assert connection_cap(16_384, 1024) == 1024 - 128
    assert connection_cap(48, 256) == 48
    assert connection_cap(1000, 256) == 256 - 64
    assert connection_cap(10, 10) == 1


def test_refusal_is_a_complete_json_answer() -> None:
    head, _, body = REFUSED.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in head and b"Retry-After: 1" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["error"]["code"] == "too_many_connections"


def test_accept_errors_are_reported_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    handler = AcceptErrorLog(interval_s=10.0, clock=lambda: now[0])
    others: list[dict[str, Any]] = []
    handler.previous = lambda loop, context: others.append(context)
    loop = asyncio.new_event_loop()
    context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.http.server"):
            for second in range(30):  # 30 s of a hot accept loop: 2,048 failures a second
                now[0] = float(second)
                for _ in range(2048):
                    handler(loop, context)
            handler(loop, {"message": "something else"})
    finally:
        loop.close()
    reports = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(reports) == 3  # at 0, 10 and 20 s
    assert all(r.exc_info is None for r in reports)
    assert "20480 failed accepts" in reports[1].getMessage()
    assert handler.total == 30 * 2048
    assert others == [{"message": "something else"}]

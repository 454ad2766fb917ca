"""The foreground loop shared by `tokenrelay broker`, `broker --nodes` and `registry`."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from schemas.errors import BrokerError
from services.local.foreground import run_foreground


class Service:
    title = "the test service"

    def __init__(self, exits_after: int | None = None, fail_start: bool = False):
        self.exits_after = exits_after
        self.fail_start = fail_start
        self.checks = 0
        self.stopped = 0
        self.aborted = threading.Event()

    def start(self) -> str:
        if self.fail_start:
            raise BrokerError("cannot start")
        return "127.0.0.1:1"

    def stop(self) -> None:
        self.stopped += 1

    def abort_start(self) -> None:
        self.aborted.set()

    def ready_lines(self, address: str) -> list[str]:
        return [f"ready on {address}"]

    def check(self) -> int | None:
        self.checks += 1
        return 3 if self.exits_after is not None and self.checks >= self.exits_after else None


def test_a_service_that_dies_ends_the_command_with_its_code_and_is_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    service = Service(exits_after=2)
    assert run_foreground(service, BrokerError) == 3
    assert service.stopped == 1 and "ready on 127.0.0.1:1" in capsys.readouterr().out


def test_sigterm_stops_it_cleanly() -> None:
    service = Service()
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert run_foreground(service, BrokerError) == 0
    finally:
        timer.cancel()
    assert service.stopped == 1 and service.aborted.is_set()
    assert signal.getsignal(signal.SIGTERM) is before  # the command's own handler is gone again


def test_a_start_error_without_a_signal_is_raised() -> None:
    with pytest.raises(BrokerError):
        run_foreground(Service(fail_start=True), BrokerError)

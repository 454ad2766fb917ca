"""A child service in the foreground: start it, say where it is, watch it, stop it on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Protocol, Self


class ForegroundService(Protocol):
    """The local broker, the local cluster or the embedded registry, as a command runs them."""

    title: str  # e.g. "the Kafka broker", for the "stopping …" line

    def start(self) -> str:
        """Start and return the address clients use."""
        ...

    def stop(self) -> object: ...

    def abort_start(self) -> None:
        """Make a ``start()`` in progress give up (a signal arrived)."""
        ...

    def ready_lines(self, address: str) -> list[str]:
        """What to print once it is ready (the address, the `export` lines)."""
        ...

    def check(self) -> int | None:
        """None while it serves (restarting parts that died, if it does that); else its exit code, having said why."""
        ...


class Service:
    """Base of the child services: ``with service:`` starts and stops it; ``run_foreground()`` runs it as a command."""

    start_error: type[Exception] = Exception

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def run_foreground(self) -> int:
        """Start, print where it is, block until SIGINT/SIGTERM or its end, stop; returns an exit code."""
        return run_foreground(self, self.start_error)  # type: ignore[arg-type]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_foreground(service: ForegroundService, start_error: type[Exception]) -> int:
    """Run ``service`` until SIGINT/SIGTERM or its end; returns an exit code. A signal during start is a clean 0."""
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()
        service.abort_start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            address = service.start()
        except start_error:
            if stop_requested.is_set():
                return 0
            raise
        for line in service.ready_lines(address):
            print(line, flush=True)
        while not stop_requested.wait(0.5):
            code = service.check()
            if code is not None:
                return code
        print(f"stopping {service.title}…", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.stop()

"""A process's last resort: when a clean stop takes too long, it exits anyway.

A clean stop waits on Kafka (the last acknowledgements, leaving the group); with the brokers gone, a client's close
can wait for minutes, and a process whose parent died meanwhile would run on unseen. What a process leaves unfinished
is continued from the log by another one, so exiting is safe."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

STOP_DEADLINE_S = 30.0  # beyond the worker's 5 s drain and the producers' 10 s flush

_armed = threading.Lock()


def exit_after(seconds: float = STOP_DEADLINE_S, what: str = "process") -> None:
    """From the first call on, exit with code 1 after ``seconds`` unless the process has ended by then."""
    if not _armed.acquire(blocking=False):
        return

    def expire() -> None:
        log.error("the %s did not stop cleanly within %.0f s; exiting", what, seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.name = "stop-deadline"
    timer.start()

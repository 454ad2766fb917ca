"""Logging for every component: one format, and one filter that logs a repeated warning once per interval, counted.

A broker outage made aiokafka log ~734,000 ERROR lines in 63 s (`Unable connect to node`, `Unable to update
metadata`), and analytics logged one WARNING per undecodable record. Repeats are told apart by logger, level and
message template (before its arguments), so "node 1" and "node 2" are the same message.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

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


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """The logging of a tokenrelay process: its level, the one format, repeats limited."""
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=stream or sys.stderr)
    limit_repeats()

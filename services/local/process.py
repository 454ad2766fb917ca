"""Child processes that never outlive their parent."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from typing import Any

from services.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when the thread that forked it dies (Linux; a no-op elsewhere)."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def spawn(argv: list[str], *, preexec: Callable[[], None] | None = None, **popen: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **popen)`` for a child that gets SIGTERM when this process dies (then ``preexec``).

    PDEATHSIG fires when the *thread* that forked the child ends, not the process: a child forked from a short-lived
    thread (``asyncio.to_thread``, a test's executor) would be stopped as soon as that thread returned. So every
    child is forked from one spawner thread that lives as long as the process."""
    global _spawner
    dies_with_us = die_with_parent()

    def preexec_fn() -> None:
        dies_with_us()
        if preexec is not None:
            preexec()

    with _spawner_lock:
        if _spawner is None:
            # One thread, never idle-reaped: ThreadPoolExecutor keeps its workers until shutdown.
            _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")
        spawner = _spawner

    def fork() -> subprocess.Popen[Any]:
        return subprocess.Popen(argv, preexec_fn=preexec_fn, **popen)

    return spawner.submit(fork).result()


def child_env(
    settings: Settings, extra: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of a child process that must see exactly these settings (plus ``extra``)."""
    env = dict(os.environ if base is None else base)
    env.update(settings.to_env())
    env.update(extra or {})
    return env


def quiet_env(settings: Settings, **extra: str) -> dict[str, str]:
    """``child_env`` of a service that tests and benchmarks start: it logs warnings and errors only."""
    return child_env(settings, {"TOKENRELAY_LOG_LEVEL": "WARNING", **extra})


def terminate(proc: subprocess.Popen[Any], timeout_s: float, what: str) -> int:
    """Stop a child: SIGTERM (a clean shutdown), then SIGKILL after ``timeout_s``; returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", what, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode

"""What keeps one test from holding up or disturbing the next: threads that cannot block a loop's shutdown for
ever, and child processes that do not outlive their test."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

THREAD_GRACE_S = 10.0  # how long a loop's shutdown waits for its threads to end before leaving them behind
CHILD_GRACE_S = 5.0  # SIGTERM, then SIGKILL

T = TypeVar("T")


class DaemonThreads(concurrent.futures.ThreadPoolExecutor):
    """An event loop's default executor (``asyncio.to_thread``, ``run_in_executor(None, ...)``): every call in a
    daemon thread of its own. asyncio's own executor makes a loop's shutdown wait for its threads without end, so a
    blocking call without a deadline in a timed-out test would hold up the whole run; this one waits
    ``THREAD_GRACE_S``, names the threads still running with their stacks, and lets the run go on."""

    # A ThreadPoolExecutor only because asyncio accepts nothing else as a default executor: its pool is never used.
    def __init__(self, grace_s: float = THREAD_GRACE_S) -> None:
        super().__init__(max_workers=1)
        self.grace_s = grace_s
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        # asyncio.to_thread submits functools.partial(context.run, func, ...): name the thread after func.
        target = fn.args[0] if isinstance(fn, functools.partial) and fn.args else fn
        thread = threading.Thread(target=run, daemon=True, name=f"to_thread:{getattr(target, '__qualname__', target)}")
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not wait:
            return
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + self.grace_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in threads if t.is_alive()]
        if stuck:
            frames = sys._current_frames()
            report = [f"{len(stuck)} thread(s) still running {self.grace_s:g} s after their loop ended (left behind):"]
            for t in stuck:
                frame = frames.get(t.ident or -1)
                report.append(f"--- {t.name}\n" + ("".join(traceback.format_stack(frame)) if frame else ""))
            print("\n".join(report), file=sys.stderr, flush=True)


def bounded_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose default executor is ``DaemonThreads``."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(DaemonThreads())
    return loop


def live_children() -> set[int]:
    """Pids of this process's children that still run (zombies left out)."""
    pids = set()
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
    return pids


def reap(pids: set[int]) -> list[str]:
    """Stop these children and everything they started (SIGTERM, then SIGKILL); their command lines."""
    procs: list[psutil.Process] = []
    names = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            names.append(" ".join(proc.cmdline())[:200])
            procs += [*proc.children(recursive=True), proc]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=CHILD_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=CHILD_GRACE_S)
    return names


async def in_thread(fn: Callable[[threading.Event], T], *, grace_s: float = 5.0) -> T:
    """``fn(stop)`` in a thread of its own, for blocking clients (confluent-kafka's). ``fn`` keeps a deadline of its
    own and returns soon after ``stop`` is set, which happens when the awaiting task is cancelled (its test timed out
    or failed): the thread then ends with its test instead of running on into the next one."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, fn, stop)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({future}, timeout=grace_s)
        raise

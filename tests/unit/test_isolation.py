"""The test loops' executor: results and errors come back, and a stuck thread cannot hold up a loop's shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.isolation import DaemonThreads, in_thread


async def test_to_thread_runs_on_a_daemon_thread_and_returns_its_result() -> None:
    assert await asyncio.to_thread(lambda: threading.current_thread().daemon)
    with pytest.raises(ZeroDivisionError):
        await asyncio.to_thread(lambda: 1 / 0)


def test_shutdown_leaves_a_stuck_thread_behind_after_the_grace(capsys: pytest.CaptureFixture[str]) -> None:
    release = threading.Event()
    executor = DaemonThreads(grace_s=0.2)
    future = executor.submit(release.wait, 30)
    began = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - began < 5 and not future.done()
    assert "left behind" in capsys.readouterr().err
    release.set()
    assert future.result(5) is True


async def test_in_thread_stops_its_thread_when_the_awaiting_task_is_cancelled() -> None:
    ended = threading.Event()

    def poll(stop: threading.Event) -> None:
        while not stop.wait(0.01):  # a blocking client polling until told to stop
            pass
        ended.set()

    task = asyncio.create_task(in_thread(poll))
    await asyncio.sleep(0)  # let it start its thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended.is_set()
    assert await in_thread(lambda stop: 42) == 42

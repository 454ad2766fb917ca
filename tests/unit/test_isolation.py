"""The test loops' executor: results and errors come back, and a stuck thread cannot hold up a loop's shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.isolation import DaemonThreads


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

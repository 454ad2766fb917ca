"""Children tied to their parent die with the process, not with the thread that started them; a stop that hangs
ends at its deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from services.local.process import die_with_parent, spawn
from tests.waiting import wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


async def _start_in_short_lived_thread(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Run ``start()`` in a thread that ends right away; return the child once that thread is gone from the kernel."""
    box: list[subprocess.Popen[bytes]] = []
    native: list[int] = []

    def run() -> None:
        native.append(threading.get_native_id())
        box.append(start())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    # join() returns before the kernel task exits; PDEATHSIG fires at that exit.
    task = Path(f"/proc/self/task/{native[0]}")
    await wait_until(lambda: not task.exists(), "the starting thread never left the kernel", timeout_s=10)
    return box[0]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
async def test_a_child_spawned_from_a_short_lived_thread_outlives_that_thread() -> None:
    proc = await _start_in_short_lived_thread(lambda: spawn(SLEEPER))
    try:
        assert proc.poll() is None, f"the child ended with {proc.returncode} when the thread that started it ended"
    finally:
        _stop(proc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
async def test_a_plain_popen_with_the_death_signal_dies_with_its_thread() -> None:
    """The hazard spawn() exists for: without it, the signal follows the forking thread."""
    proc = await _start_in_short_lived_thread(lambda: subprocess.Popen(SLEEPER, preexec_fn=die_with_parent()))
    try:
        assert proc.wait(20) == -15
    finally:
        if proc.poll() is None:
            _stop(proc)


def test_spawn_runs_the_extra_preexec_in_the_child() -> None:
    proc = spawn(
        [sys.executable, "-c", "import os; print(os.environ.get('X'))"],
        preexec=lambda: os.environ.__setitem__("X", "set-in-child"),
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "set-in-child"


def test_a_stop_that_hangs_ends_at_its_deadline_and_arming_twice_changes_nothing() -> None:
    """services.lifecycle.exit_after: the process exits 1 even while its main thread is stuck."""
    code = (
        "import time; from services.lifecycle import exit_after; "
        "exit_after(0.5, 'test'); exit_after(600, 'test'); time.sleep(600)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "did not stop cleanly" in proc.stderr

"""The analytics service in a subprocess, and JSON reads of its HTTP pages, for the integration tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from services.local.process import spawn

ROOT = Path(__file__).resolve().parents[2]


def get_json(url: str) -> dict[str, Any] | None:
    """The JSON body at ``url``; None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


class Analytics:
    """`python -m services.cli analytics` in a subprocess, its output appended to ``log``; stopped and started again."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = spawn(
                [sys.executable, "-m", "services.cli", "analytics"], env=self.env, cwd=ROOT, stdout=out, stderr=out
            )

    def usage(self) -> dict[str, Any] | None:
        return get_json(f"http://127.0.0.1:{self.port}/usage")

    def wait_tenants(self, tenants: set[str], timeout_s: float = 90.0) -> dict[str, Any]:
        """Usage once every one of these tenants is counted (see scripted_events.barrier)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            last = self.usage()
            if last is not None and tenants <= set(last["by_tenant"]):
                return last
            time.sleep(0.3)
        raise AssertionError(f"tenants {sorted(tenants)} never counted: {last}\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.proc = None
        return code

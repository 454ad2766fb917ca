"""`tokenrelay up`: the whole stack from one command, on its own local broker, stopped cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.localbroker.runner import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

READY_S = 180.0


def _get(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        return json.loads(response.read())


def _sse_events(url: str) -> list[tuple[str, dict[str, Any]]]:
    """Read an SSE stream to its terminal event, as `curl -N` would."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "message", ""
    with urllib.request.urlopen(url, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data += line.split(":", 1)[1].strip()
            elif line == "" and data:
                events.append((name, json.loads(data)))
                if name in ("done", "error"):
                    return events
                name, data = "message", ""
    return events


def _wait_for_banner(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "Ctrl-C stops everything" in line:
            return "".join(seen)
    raise AssertionError(f"no banner from `tokenrelay up` (exit {proc.poll()}):\n{''.join(seen)}")


def test_up_runs_the_whole_stack_and_stops_cleanly(tmp_path: Path, topic_prefix: str) -> None:
    gateway_port, analytics_port, broker_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") or k == "TOKENRELAY_CACHE_DIR"} | {
        "TOKENRELAY_BROKER_PORT": str(broker_port),
        "TOKENRELAY_BROKER_DATA_DIR": str(tmp_path / "broker"),
        "TOKENRELAY_GATEWAY_PORT": str(gateway_port),
        "TOKENRELAY_ANALYTICS_PORT": str(analytics_port),
        "TOKENRELAY_WORKER_METRICS_PORT": "0",
        "TOKENRELAY_TOPIC_PREFIX": topic_prefix,
        "TOKENRELAY_ANALYTICS_WINDOW_S": "5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"], env=env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        banner = _wait_for_banner(proc, time.monotonic() + READY_S)
        gateway = f"http://127.0.0.1:{gateway_port}"
        assert f"{gateway}/" in banner and f"http://127.0.0.1:{analytics_port}/" in banner and "curl" in banner
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert any("java" in p.name() for p in descendants), "the local broker JVM is a child of `up`"

        # The README's curl example: submit, then follow the SSE stream to its end.
        submitted = [
            _post(f"{gateway}/v1/requests", {"prompt": f"The weather today {i}", "max_tokens": 12}) for i in range(3)
        ]
        completion_tokens = 0
        for item in submitted:
            events = _sse_events(f"{gateway}{item['events_url']}")
            names = [name for name, _ in events]
            assert names[0] == "started" and names[-1] == "done" and "token" in names
            tokens = sum(len(data["token_ids"]) for name, data in events if name == "token")
            usage = events[-1][1]["usage"]
            assert usage["completion_tokens"] == tokens
            completion_tokens += tokens

        # Analytics counts exactly the completion tokens of the finished requests.
        deadline = time.monotonic() + 150
        usage_seen: Any = None
        while time.monotonic() < deadline:
            usage_seen = _get(f"http://127.0.0.1:{analytics_port}/usage")
            if usage_seen["totals"]["requests"] >= 3:
                break
            time.sleep(1)
        assert usage_seen["totals"]["requests"] == 3, usage_seen
        assert usage_seen["totals"]["completion_tokens"] == completion_tokens, usage_seen
    finally:
        pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0
    leftovers = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert leftovers == [], f"processes left running after `up` stopped: {leftovers}"

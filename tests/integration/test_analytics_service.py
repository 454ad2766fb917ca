"""The analytics service on a real broker: exact usage from a scripted log, unchanged over restarts and kills."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.localbroker.runner import free_port
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.scripted_events import produce, script

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except OSError:
        return None


class Analytics:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "analytics"], env=self.env, cwd=ROOT, stdout=out, stderr=out
            )

    def usage(self) -> dict[str, Any] | None:
        return _get(f"http://127.0.0.1:{self.port}/usage")

    def wait_totals(self, completion: int, timeout_s: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            last = self.usage()
            if last is not None and last["totals"]["completion_tokens"] >= completion:
                return last
            time.sleep(0.3)
        raise AssertionError(f"usage never reached {completion}: {last}\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.proc = None
        return code


@pytest.fixture
def analytics(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[tuple[Settings, Analytics]]:
    port = free_port()
    env = {
        **os.environ,
        "TOKENRELAY_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "TOKENRELAY_TOPIC_PREFIX": topic_prefix,
        "TOKENRELAY_ANALYTICS_PORT": str(port),
        "TOKENRELAY_CACHE_DIR": str(tmp_path / "cache"),
        "TOKENRELAY_EVENTS_PARTITIONS": "4",
        "TOKENRELAY_LOG_LEVEL": "WARNING",
    }
    settings = Settings.from_env(env)
    service = Analytics(env, port, tmp_path / "analytics.log")
    yield settings, service
    if service.proc is not None:
        service.proc.kill()
        service.proc.wait()


def test_usage_counts_exactly_and_survives_restarts(analytics: tuple[Settings, Analytics]) -> None:
    settings, service = analytics
    asyncio.run(ensure_topics(settings))
    events, expected = script(40, duplicate_finished=3, failed=2)
    asyncio.run(produce(settings, events, extra_raw=[b"not avro at all"]))
    service.start()
    usage = service.wait_totals(expected.completion_tokens)
    time.sleep(1.0)  # anything counted twice would show up now
    usage = service.usage()
    assert usage is not None
    totals = usage["totals"]
    assert totals["completion_tokens"] == expected.completion_tokens
    assert totals["prompt_tokens"] == expected.prompt_tokens
    assert totals["requests"] == expected.finished
    assert totals["failed"] == 2
    assert {m: row["completion_tokens"] for m, row in usage["by_model"].items()} == expected.by_model
    assert sum(row["completion_tokens"] for row in usage["by_tenant"].values()) == expected.completion_tokens
    latency = _get(f"http://127.0.0.1:{service.port}/latency")
    assert latency is not None and latency["recent"]["ttft"]["count"] == expected.finished
    with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/", timeout=5) as page:
        assert b"<svg" in page.read()

    # Killed right after counting: offsets are likely not committed yet, so the restart replays events.
    assert service.stop(signal.SIGKILL) != 0
    service.start()
    again = service.wait_totals(expected.completion_tokens)
    more, more_expected = script(5)
    asyncio.run(produce(settings, more))
    total = expected.completion_tokens + more_expected.completion_tokens
    again = service.wait_totals(total)
    time.sleep(1.0)
    again = service.usage()
    assert again is not None and again["totals"]["completion_tokens"] == total
    assert again["totals"]["requests"] == expected.finished + more_expected.finished

    # A clean stop and start: state comes back from the changelog topics, nothing counted twice.
    assert service.stop() == 0
    service.start()
    final = service.wait_totals(total)
    time.sleep(1.0)
    final = service.usage()
    assert final is not None and final["totals"] == again["totals"]

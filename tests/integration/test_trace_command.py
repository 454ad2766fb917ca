"""One request through a gateway and a worker that log JSON lines (and export the dashboards' metrics); then
`tokenrelay trace` tells its timeline from the log alone, as JSON and as a table, and every log line of the two is
one JSON object naming the request it was about."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.local.broker.cluster import free_port_block
from services.local.process import child_env, quiet_env, spawn, terminate
from services.settings import Settings
from tests.integration.gateway_support import ROOT, GatewayProcess, _in_thread, gateway_settings, metric, read_sse
from tests.integration.secure_support import as_role
from tests.integration.worker_helpers import wait_announced
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

JSON_LOGS = {"TOKENRELAY_LOG_FORMAT": "json", "TOKENRELAY_LOG_LEVEL": "INFO"}
SYNTHETIC = {"TOKENRELAY_ENGINE": "synthetic", "TOKENRELAY_SYNTHETIC_TOKENS_PER_S": "400"}
MAX_TOKENS = 6


def _cli(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    env = child_env(as_role(settings, "admin"), {"TOKENRELAY_LOG_LEVEL": "WARNING"})
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@contextlib.contextmanager
def _logged_worker(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A synthetic-engine worker that logs JSON lines at INFO to ``log_path``."""
    env = quiet_env(as_role(settings, "worker"), **SYNTHETIC, **JSON_LOGS)
    with log_path.open("ab") as log:
        proc = spawn([sys.executable, "-m", "workers.main"], cwd=ROOT, env=env, stderr=log)
    try:
        yield proc
    finally:
        terminate(proc, 20, "worker")


def _log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_trace_of_one_request_and_its_json_logs(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, worker_metrics_port=free_port_block(1))
    worker_log, gateway_log = tmp_path / "worker.log", tmp_path / "gateway.log"
    gateway = GatewayProcess(settings, log_path=gateway_log, TOKENRELAY_LOG_FORMAT="json", TOKENRELAY_LOG_LEVEL="INFO")
    with _logged_worker(settings, worker_log):
        await asyncio.to_thread(_in_thread, wait_announced(settings, "default"))
        try:
            await gateway.start_async()
            await gateway.wait_serving()
            async with aiohttp.ClientSession() as session:
                body = {"prompt": "trace me", "max_tokens": MAX_TOKENS}
                async with session.post(f"{gateway.url}/v1/requests", json=body) as response:
                    assert response.status == 202
                    rid = (await response.json())["id"]
                status, events = await read_sse(session, f"{gateway.url}/v1/requests/{rid}/events", timeout_s=60)
                assert status == 200 and events[-1]["event"] == "done"
                assert await metric(session, gateway.url, "tokenrelay_gateway_connections") >= 1  # this one
                worker_url = f"http://127.0.0.1:{settings.worker_metrics_port}"

                async def slots_sampled() -> bool:
                    return await metric(session, worker_url, "batch_slots") == settings.max_batch_size

                await wait_until(slots_sampled, "the worker's batch slots on its /metrics", timeout_s=30)
        finally:
            gateway.stop()

    done = await asyncio.to_thread(_cli, settings, "trace", rid, "--json")
    assert done.returncode == 0, done.stderr
    timeline = json.loads(done.stdout)
    assert timeline["request_id"] == rid and timeline["status"] == "finished" and timeline["model"] == "default"
    steps = {step["what"]: step for step in timeline["steps"]}
    assert [s["what"] for s in timeline["steps"]] == ["accepted", "queued", "started", "first_token", "end"]
    assert steps["accepted"]["at_ms"] == 0 and steps["accepted"]["priority"] == "interactive"
    assert steps["queued"]["topic"] == settings.requests_topic_for("default")
    assert steps["queued"]["offset"] >= 0
    assert steps["end"]["finish_reason"] == "length" and steps["end"]["completion_tokens"] == MAX_TOKENS
    (run,) = timeline["runs"]
    assert run["how"] == "started" and run["tokens"] == MAX_TOKENS and run["ended"] == "finished"
    assert steps["started"]["worker"] == run["worker"] != ""

    table = await asyncio.to_thread(_cli, settings, "trace", rid)
    assert table.returncode == 0, table.stderr
    for word in (rid, "status=finished", "accepted", "queued", "started", "first_token", "finished length"):
        assert word in table.stdout

    unknown = await asyncio.to_thread(_cli, settings, "trace", "01890a5d-ac96-774b-bcce-b302099a8057")
    assert unknown.returncode == 1 and "nothing of it in the log" in unknown.stdout

    for path in (gateway_log, worker_log):
        lines = _log_lines(path)  # every line is one JSON object
        assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
        about = [line for line in lines if line.get("request_id") == rid]
        assert about, f"no line of {path.name} names the request"
    assert any("submitted" in line["message"] for line in _log_lines(gateway_log) if line.get("request_id") == rid)
    assert any("finished" in line["message"] for line in _log_lines(worker_log) if line.get("request_id") == rid)

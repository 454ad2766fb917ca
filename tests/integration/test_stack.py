"""`tokenrelay up`: the whole stack from one command, on its own local broker, stopped cleanly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.local.broker.runner import free_port
from services.local.runstate import read_state
from services.settings import Settings

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


def _tokens(events: list[tuple[str, dict[str, Any]]]) -> int:
    return sum(len(data["token_ids"]) for name, data in events if name == "token")


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


def test_up_runs_the_whole_stack_and_stops_cleanly(tmp_path: Path, topic_prefix: str, schema_registry_url: str) -> None:
    gateway_port, analytics_port, broker_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") or k == "TOKENRELAY_CACHE_DIR"} | {
        "TOKENRELAY_BROKER_DATA_DIR": str(tmp_path / "broker"),
        "TOKENRELAY_TOPIC_PREFIX": topic_prefix,
        "TOKENRELAY_ANALYTICS_WINDOW_S": "5",
        # The session's registry: `up` starts its own only when none is configured (one Apicurio per test session).
        "TOKENRELAY_SCHEMA_REGISTRY_URL": schema_registry_url,
    }
    ports = ["--broker-port", str(broker_port), "--gateway-port", str(gateway_port)]
    ports += ["--analytics-port", str(analytics_port), "--metrics-port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", *ports], env=env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    cache_dir = Settings.from_env(env).cache_dir
    try:
        banner = _wait_for_banner(proc, time.monotonic() + READY_S)
        gateway = f"http://127.0.0.1:{gateway_port}"
        assert f"{gateway}/" in banner and f"http://127.0.0.1:{analytics_port}/" in banner
        assert f"127.0.0.1:{broker_port} (local broker, topics {topic_prefix}*)" in banner
        assert schema_registry_url in banner
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert any("java" in p.name() for p in descendants), "the local broker JVM is a child of `up`"
        # Ready means a worker answered: the probe request's id is on the worker's line, and it finished.
        probe_id = re.search(r"worker .*answered a first request \(([0-9a-f-]{36})\)", banner)
        assert probe_id is not None, banner
        probe_events = _sse_events(f"{gateway}/v1/requests/{probe_id.group(1)}/events")
        assert probe_events[-1][0] == "done"
        # Component logs went to files, not to this output.
        assert "INFO" not in banner and (cache_dir / "logs" / f"up-{gateway_port}" / "worker.log").exists()

        # The banner's curl line works as printed.
        curl = next(line.strip() for line in banner.splitlines() if line.strip().startswith("curl "))
        if shutil.which("curl"):
            answer = json.loads(subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120).stdout)
            assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"] > 0

        # A client command in another shell (no bootstrap, no prefix) finds the running stack.
        client_env = {k: v for k, v in env.items() if k not in ("TOKENRELAY_TOPIC_PREFIX",)}
        submitted_cli = subprocess.run(
            [sys.executable, "-m", "services.cli", "submit", "What is a Kafka topic?", "--follow"],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submitted_cli.returncode == 0, submitted_cli.stderr
        cli_id, cli_text = submitted_cli.stdout.split("\n", 1)
        assert cli_text.strip() and "INFO" not in submitted_cli.stdout + submitted_cli.stderr

        # The README's curl example: submit, then follow the SSE stream to its end.
        submitted = [
            _post(f"{gateway}/v1/requests", {"prompt": f"The weather today {i}", "max_tokens": 12}) for i in range(3)
        ]
        completion_tokens = _tokens(probe_events) + _tokens(_sse_events(f"{gateway}/v1/requests/{cli_id}/events"))
        if shutil.which("curl"):
            completion_tokens += answer["usage"]["completion_tokens"]
        for item in submitted:
            events = _sse_events(f"{gateway}{item['events_url']}")
            names = [name for name, _ in events]
            assert names[0] == "started" and names[-1] == "done" and "token" in names
            usage = events[-1][1]["usage"]
            assert usage["completion_tokens"] == _tokens(events)
            completion_tokens += _tokens(events)

        # Analytics counts exactly the completion tokens of the finished requests (the probe's too).
        expected_requests = 5 + (1 if shutil.which("curl") else 0)
        deadline = time.monotonic() + 150
        usage_seen: Any = None
        while time.monotonic() < deadline:
            usage_seen = _get(f"http://127.0.0.1:{analytics_port}/usage")
            if usage_seen["totals"]["requests"] >= expected_requests:
                break
            time.sleep(1)
        assert usage_seen["totals"]["requests"] == expected_requests, usage_seen
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
    state = read_state(Settings.from_env(env))
    assert state is None or state.pid != proc.pid, "the state file of a stopped `up` is removed"


def test_up_refuses_a_busy_port_before_any_slow_work(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
        env |= {"TOKENRELAY_CACHE_DIR": str(tmp_path), "TOKENRELAY_BROKER_DATA_DIR": str(tmp_path / "broker")}
        argv = ["up", "--gateway-port", str(port), "--broker-port", str(free_port()), "--metrics-port", "0"]
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *argv], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2
    assert done.stderr == (
        f"tokenrelay: port {port} (gateway) is already in use: stop what listens there, "
        "or pick another port with --gateway-port or TOKENRELAY_GATEWAY_PORT\n"
    )
    assert not (tmp_path / "broker").exists(), "the check comes before the broker starts"


def test_up_on_an_existing_cluster_says_so_and_starts_no_broker(
    kafka_bootstrap: str, topic_prefix: str, schema_registry_url: str
) -> None:
    gateway_port, analytics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") or k == "TOKENRELAY_CACHE_DIR"}
    env |= {"TOKENRELAY_TOPIC_PREFIX": topic_prefix, "TOKENRELAY_ANALYTICS_WINDOW_S": "5"}
    # An existing registry too: then `up` starts no JVM at all.
    env |= {"TOKENRELAY_SCHEMA_REGISTRY_URL": schema_registry_url}
    argv = ["up", "--bootstrap", kafka_bootstrap, "--engine", "synthetic", "--metrics-port", "0"]
    argv += ["--gateway-port", str(gateway_port), "--analytics-port", str(analytics_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *argv], env=env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        banner = _wait_for_banner(proc, time.monotonic() + READY_S)
        assert f"existing cluster at {kafka_bootstrap} (from flag --bootstrap)" in banner
        assert f"{kafka_bootstrap} (existing cluster, topics {topic_prefix}*)" in banner
        assert "synthetic engine" in banner
        children = psutil.Process(proc.pid).children(recursive=True)
        assert not any("java" in p.name() for p in children), "no local broker or registry when both are given"
        item = _post(f"http://127.0.0.1:{gateway_port}/v1/requests", {"prompt": "one two", "max_tokens": 5})
        events = _sse_events(f"http://127.0.0.1:{gateway_port}{item['events_url']}")
        assert events[-1][0] == "done" and _tokens(events) == 5
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        proc.wait(90)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0


def test_up_with_an_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env |= {"TOKENRELAY_CACHE_DIR": str(tmp_path), "TOKENRELAY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    argv = ["up", "--gateway-port", str(free_port()), "--analytics-port", str(free_port()), "--metrics-port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith("tokenrelay: no Kafka broker answers at 127.0.0.1:") and done.stderr.count("\n") == 1
    assert "(from TOKENRELAY_KAFKA_BOOTSTRAP)" in done.stderr and "Traceback" not in done.stderr


def test_up_secure_runs_each_component_as_its_role(tmp_path: Path, topic_prefix: str, schema_registry_url: str) -> None:
    gateway_port, analytics_port, broker_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") or k == "TOKENRELAY_CACHE_DIR"}
    env |= {
        "TOKENRELAY_BROKER_DATA_DIR": str(tmp_path / "broker"),
        "TOKENRELAY_TOPIC_PREFIX": topic_prefix,
        "TOKENRELAY_ANALYTICS_WINDOW_S": "5",
        "TOKENRELAY_SCHEMA_REGISTRY_URL": schema_registry_url,
    }
    argv = ["up", "--secure", "--engine", "synthetic", "--broker-port", str(broker_port), "--metrics-port", "0"]
    argv += ["--gateway-port", str(gateway_port), "--analytics-port", str(analytics_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *argv], env=env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        banner = _wait_for_banner(proc, time.monotonic() + READY_S)
        assert "SASL_SSL with SCRAM-SHA-512, ACLs on" in banner
        assert f"{tmp_path / 'broker-secure' / 'security' / 'ca.pem'}" in banner
        assert "export TOKENRELAY_KAFKA_SASL_USERNAME=admin" in banner
        # Each child was started with its own user (the gateway's environment is visible to us).
        children = psutil.Process(proc.pid).children(recursive=True)
        users = {p.environ().get("TOKENRELAY_KAFKA_SASL_USERNAME") for p in children if "java" not in p.name()}
        assert {"worker", "gateway", "analytics"} <= users and "admin" not in users
        item = _post(f"http://127.0.0.1:{gateway_port}/v1/requests", {"prompt": "one two", "max_tokens": 5})
        events = _sse_events(f"http://127.0.0.1:{gateway_port}{item['events_url']}")
        assert events[-1][0] == "done" and _tokens(events) == 5
        deadline = time.monotonic() + 120
        while _get(f"http://127.0.0.1:{analytics_port}/usage")["totals"]["requests"] < 2:  # the probe and ours
            assert time.monotonic() < deadline, "analytics never counted the requests"
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0

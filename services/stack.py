"""`tokenrelay up`: broker, topics, worker, gateway and analytics on one machine, stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from services.process import child_env, die_with_parent
from services.settings import Settings

log = logging.getLogger(__name__)


READY_TIMEOUT_S = 600.0  # the first start builds the default model
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class Child:
    """One component of the stack as a child process."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    ready_url: str | None = None


def _host(settings: Settings) -> str:
    # A gateway bound to every interface is still reached on loopback from here.
    return "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::", "") else settings.gateway_host


def child_plan(settings: Settings, base_env: Mapping[str, str] | None = None) -> list[Child]:
    """The processes of the stack in start order (stopped in reverse), each told the same cluster and prefix."""
    env = child_env(settings, base=base_env)
    cli = (sys.executable, "-m", "services.cli")
    host = _host(settings)
    return [
        Child("worker", (*cli, "worker"), env),
        Child("gateway", (*cli, "gateway"), env, f"http://{host}:{settings.gateway_port}/readyz"),
        Child("analytics", (*cli, "analytics"), env, f"http://{host}:{settings.analytics_port}/usage"),
    ]


def banner(settings: Settings, *, local_broker: bool) -> str:
    """What `tokenrelay up` prints once the stack answers."""
    host = _host(settings)
    gateway = f"http://{host}:{settings.gateway_port}"
    broker = "local broker" if local_broker else "existing cluster"
    engine = " (synthetic engine: fixed-rate tokens, no model)" if settings.engine == "synthetic" else ""
    return "\n".join(
        [
            "",
            f"tokenrelay is up{engine}",
            f"  playground   {gateway}/",
            f"  analytics    http://{host}:{settings.analytics_port}/",
            f"  kafka        {settings.kafka_bootstrap} ({broker}, topics {settings.topic_prefix}*)",
            "",
            "try:",
            f"  curl -s {gateway}/v1/requests -H 'content-type: application/json' \\",
            '       -d \'{"prompt": "Once upon a time", "max_tokens": 32}\'',
            f"  curl -N {gateway}/v1/requests/<id>/events",
            "",
            "Ctrl-C stops everything.",
            "",
        ]
    )


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Stack:
    """Starts the children in order, watches them, stops them in reverse order."""

    def __init__(self, children: list[Child], stop: threading.Event) -> None:
        self.children = children
        self.stop_requested = stop
        self.procs: list[tuple[Child, subprocess.Popen[bytes]]] = []

    def start(self, child: Child) -> subprocess.Popen[bytes]:
        print(f"starting {child.name}…", file=sys.stderr, flush=True)
        # Own process group: a terminal's Ctrl-C reaches only us, and we stop the children in order.
        proc = subprocess.Popen(
            list(child.argv), env=dict(child.env), preexec_fn=die_with_parent(), start_new_session=True
        )
        self.procs.append((child, proc))
        return proc

    def wait_ready(self, child: Child, proc: subprocess.Popen[bytes], timeout_s: float = READY_TIMEOUT_S) -> bool:
        if child.ready_url is None:
            return proc.poll() is None
        deadline = time.monotonic() + timeout_s
        while not self.stop_requested.is_set():
            if proc.poll() is not None:
                print(f"{child.name} exited with code {proc.returncode} while starting", file=sys.stderr)
                return False
            if http_ok(child.ready_url):
                return True
            if time.monotonic() > deadline:
                print(f"{child.name} not ready at {child.ready_url} after {timeout_s:.0f}s", file=sys.stderr)
                return False
            self.stop_requested.wait(0.3)
        return False

    def exited(self) -> tuple[Child, int] | None:
        for child, proc in self.procs:
            if proc.poll() is not None:
                return child, proc.returncode
        return None

    def stop_all(self) -> None:
        for child, proc in reversed(self.procs):
            if proc.poll() is None:
                print(f"stopping {child.name}…", file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_TIMEOUT_S)
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def run_stack(settings: Settings, local_broker: bool) -> int:
    """Run the whole stack in the foreground until SIGINT/SIGTERM or a component dies; returns an exit code."""
    from services.topics import ensure_topics

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = None
    stack = Stack([], stop)
    try:
        if local_broker:
            from services.localbroker.runner import LocalBroker

            print(f"starting the local Kafka broker on port {settings.broker_port}…", file=sys.stderr, flush=True)
            broker = LocalBroker(settings, settings.broker_port, settings.broker_data_dir)
            settings = dataclasses.replace(settings, kafka_bootstrap=broker.start())
        print(f"creating topics on {settings.kafka_bootstrap}…", file=sys.stderr, flush=True)
        asyncio.run(ensure_topics(settings))
        stack.children = child_plan(settings)
        for child in stack.children:
            if stop.is_set():
                return 0
            proc = stack.start(child)
            if not stack.wait_ready(child, proc):
                return 0 if stop.is_set() else 1
        print(banner(settings, local_broker=local_broker), flush=True)
        while not stop.wait(0.5):
            dead = stack.exited()
            if dead is not None:
                print(f"{dead[0].name} exited with code {dead[1]}; stopping the stack", file=sys.stderr)
                return 1
            if broker is not None and not broker.is_running():
                print("the Kafka broker exited; stopping the stack", file=sys.stderr)
                return 1
        return 0
    finally:
        stack.stop_all()
        if broker is not None:
            print("stopping the Kafka broker…", file=sys.stderr, flush=True)
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""The chaos run's system: a 3-node cluster, the registry, 2 workers, 2 gateways, analytics; signal and restart them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from services.kafka import make_admin
from services.local.broker.cluster import free_port_block
from services.local.process import quiet_env, spawn
from services.local.readiness import gateway_serving
from services.local.registry.runner import LocalRegistry, registry_ready
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.cluster_support import ClusterProcess
from tests.integration.gateway_support import GatewayProcess
from tests.integration.worker_helpers import wait_group_members

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("broker", "worker", "gateway", "registry", "analytics")
WORKERS = 2
GATEWAYS = 2
# The built-in model is too fast to be caught mid-stream on its own: the test worker sleeps before each step.
STEP_DELAY_S = "0.04"
START_TIMEOUT_S = 300.0


@dataclass
class Member:
    """One long-lived process of the system (a broker node's JVM, a worker, ...)."""

    name: str  # broker-1, worker-2, gateway-1, registry, analytics
    role: str
    proc: subprocess.Popen[bytes] | None = None
    expected_down: bool = False  # the harness stopped it and restarts it; a death otherwise is unexpected
    unexpected_exits: list[int] = field(default_factory=list)


class System:
    """Starts every component, tells their pids, signals them, restarts what a fault stopped, says who is healthy."""

    def __init__(self, workdir: Path, producer_timeout_ms: int, cluster: ClusterProcess | None = None) -> None:
        """``cluster``: a running 3-node cluster to use (a test's fixture); by default the system starts its own."""
        self.workdir = workdir
        self.producer_timeout_ms = producer_timeout_ms
        self.own_cluster = cluster is None
        self.cluster = cluster or ClusterProcess(workdir / "cluster")
        self.registry: LocalRegistry | None = None
        self.gateways: list[GatewayProcess] = []
        self.members: dict[str, Member] = {}
        self.settings: Settings | None = None
        self.analytics_port = free_port_block(1)

    # --- start and stop ---------------------------------------------------------------------------------------

    def start(self) -> Settings:
        if self.own_cluster:
            self.cluster.start()
        base = Settings.from_env(
            {},
            kafka_bootstrap=self.cluster.bootstrap,
            topic_prefix=f"chaos{uuid.uuid4().hex[:8]}.",
            replication_factor=3,
            min_insync_replicas=2,
            events_partitions=4,
            requests_partitions=4,
            producer_timeout_ms=self.producer_timeout_ms,
            worker_metrics_port=0,
            keepalive_s=1.0,
            analytics_port=self.analytics_port,
            worker_session_timeout_ms=10_000,
        )
        self.registry = LocalRegistry(base, free_port_block(1), log_dir=self.workdir / "registry")
        # The services wait for a registry that is still starting (services.schema_registry.prepare_codec): all of
        # them start at once.
        self.registry.launch()
        settings = dataclasses.replace(base, schema_registry_url=self.registry.url)
        self.settings = settings
        asyncio.run(ensure_topics(settings))
        for i in range(1, 4):
            self.members[f"broker-{i}"] = Member(f"broker-{i}", "broker")
        self.members["registry"] = Member("registry", "registry")
        for i in range(1, GATEWAYS + 1):
            gw = GatewayProcess(
                dataclasses.replace(settings, gateway_port=free_port_block(1)),
                log_path=self.workdir / f"gateway-{i}.log",
            )
            self.gateways.append(gw)
            self.members[f"gateway-{i}"] = Member(f"gateway-{i}", "gateway")
        for i in range(1, WORKERS + 1):
            self.members[f"worker-{i}"] = Member(f"worker-{i}", "worker")
        self.members["analytics"] = Member("analytics", "analytics")
        for name, member in self.members.items():
            if member.role in ("worker", "analytics", "gateway"):
                self.launch(name)
        self.registry.wait_ready()
        health = self.wait_healthy(START_TIMEOUT_S)
        if not all(health.values()):
            sick = sorted(n for n, ok in health.items() if not ok)
            raise RuntimeError(f"not healthy {START_TIMEOUT_S:.0f}s after the start: {sick} (logs in {self.workdir})")
        return settings

    def stop(self) -> None:
        for member in self.members.values():
            member.expected_down = True
        for gw in self.gateways:
            with contextlib.suppress(Exception):
                gw.stop()
        for member in self.members.values():
            if member.proc is not None and member.proc.poll() is None:
                member.proc.send_signal(signal.SIGTERM)
        for member in self.members.values():
            if member.proc is not None:
                try:
                    member.proc.wait(30)
                except subprocess.TimeoutExpired:
                    member.proc.kill()
                    member.proc.wait()
        if self.registry is not None:
            self.registry.stop()
        if self.own_cluster:
            self.cluster.stop()

    # --- the members ------------------------------------------------------------------------------------------

    @property
    def gateway_urls(self) -> list[str]:
        return [gw.url for gw in self.gateways]

    def gateway(self, name: str) -> GatewayProcess:
        return self.gateways[int(name.split("-")[1]) - 1]

    def pid(self, name: str) -> int | None:
        """The pid to signal for a member (a broker node's JVM), None while it is down."""
        member = self.members[name]
        if member.role == "broker":
            try:
                return self.cluster.pid(int(name.split("-")[1]))
            except (LookupError, psutil.Error):
                return None
        if member.role == "registry":
            return self.registry.pid if self.registry is not None else None
        proc = self.gateway(name).proc if member.role == "gateway" else member.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def signal(self, name: str, sig: int) -> bool:
        pid = self.pid(name)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
        return False

    def launch(self, name: str) -> None:
        """Start a member again (a broker node is restarted by the cluster command itself)."""
        settings = self.settings
        assert settings is not None
        member = self.members[name]
        member.expected_down = False
        if member.role == "gateway":
            gw = self.gateway(name)
            gw.launch()
            member.proc = gw.proc
        elif member.role == "worker":
            env = {
                "TOKENRELAY_MODEL": "default",
                "TOKENRELAY_DEVICE": "cpu",
                "TOKENRELAY_MAX_BATCH_SIZE": "8",
                "TOKENRELAY_WORKER_ID": name,
                "TOKENRELAY_TEST_STEP_DELAY_S": STEP_DELAY_S,
                "OMP_NUM_THREADS": "1",
                # What a worker did with each request (taken, skipped, abandoned, assigned) is the evidence a lost
                # request needs; the log file is per run.
                "TOKENRELAY_LOG_LEVEL": "INFO",
            }
            member.proc = self._spawn(["-m", "tests.integration.slow_worker"], name, quiet_env(settings, **env))
        elif member.role == "analytics":
            env = quiet_env(settings, TOKENRELAY_CACHE_DIR=str(self.workdir / "analytics-cache"))
            member.proc = self._spawn(["-m", "services.cli", "analytics"], name, env)
        elif member.role == "registry":
            assert self.registry is not None
            self.registry.stop()
            self.registry.launch()
            member.proc = None

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as out:
            return spawn([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=out)

    def reap(self) -> list[str]:
        """Members that died without the harness stopping them (a defect to report); they are started again."""
        dead = []
        for name, member in self.members.items():
            if member.role in ("broker", "registry") or member.expected_down:
                continue
            proc = self.gateway(name).proc if member.role == "gateway" else member.proc
            if proc is not None and proc.poll() is not None:
                member.unexpected_exits.append(proc.returncode)
                dead.append(f"{name} exited with {proc.returncode}")
                self.launch(name)
        if self.registry is not None and not self.members["registry"].expected_down and not self.registry.is_running():
            self.members["registry"].unexpected_exits.append(-1)
            dead.append("registry exited")
            self.launch("registry")
        return dead

    # --- health -------------------------------------------------------------------------------------------------

    def worker_members(self) -> set[str]:
        """Member ids of the workers' consumer group now (empty when it cannot be read)."""
        settings = self.settings
        assert settings is not None

        async def read() -> set[str]:
            admin = make_admin(settings)
            await admin.start()
            try:
                (response,) = await admin.describe_consumer_groups([settings.worker_group])
                return {str(m[0]) for m in response.groups[0][5]}
            finally:
                await admin.close()

        try:
            return asyncio.run(read())
        except Exception:
            return set()

    def health(self, stale_workers: set[str] | None = None) -> dict[str, bool]:
        """Every member's health now: brokers listed by all nodes with full ISRs, /readyz, group membership.

        ``stale_workers``: group member ids of a worker that was stopped; the workers count as healthy only once none
        of them is in the group (a dead member stays until its session times out, and the group looks whole)."""
        settings = self.settings
        assert settings is not None
        out: dict[str, bool] = {}
        healed = _quietly(self.cluster.wait_healed([settings.events_topic, settings.requests_topic], timeout_s=0.1))
        for i in range(1, 4):
            out[f"broker-{i}"] = healed
        out["registry"] = (
            self.registry is not None and self.registry.port is not None and registry_ready(self.registry.url)
        )
        for i, gw in enumerate(self.gateways, 1):
            out[f"gateway-{i}"] = gateway_serving(gw.url, timeout_s=3.0, model_served=True)
        workers = _quietly(wait_group_members(settings, WORKERS, timeout_s=0.1))
        if workers and stale_workers:
            workers = not (self.worker_members() & stale_workers)
        for i in range(1, WORKERS + 1):
            out[f"worker-{i}"] = workers
        out["analytics"] = analytics_usage(self.analytics_port) is not None
        return out

    def wait_healthy(self, timeout_s: float, stale_workers: set[str] | None = None) -> dict[str, bool]:
        """Until every member is healthy (restarting whatever died meanwhile), or the deadline; the last health."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.reap()
            if self.registry is not None and self.registry.port is not None and not self.registry.is_running():
                self.launch("registry")
            health = self.health(stale_workers)
            if all(health.values()) or time.monotonic() > deadline:
                return health
            time.sleep(1.0)

    def rss(self) -> dict[str, tuple[int, float]]:
        """(pid, RSS MiB) of every member that is up."""
        out = {}
        for name in self.members:
            pid = self.pid(name)
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    out[name] = (pid, psutil.Process(pid).memory_info().rss / 2**20)
        return out


def _quietly(coro: Any) -> bool:
    try:
        asyncio.run(coro)
        return True
    except Exception:
        return False


def analytics_usage(port: int) -> dict[str, Any] | None:
    """GET /usage of the analytics service; None when it does not answer 200 (down, or rebalancing)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/usage", timeout=3) as response:
            return dict(json.loads(response.read()))
    except (OSError, ValueError):
        return None

"""`tokenrelay broker --nodes 3` as a test fixture: start it, find and SIGKILL its nodes, wait until it has healed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from schemas.errors import BrokerError
from services.local.broker.cluster import free_port_block
from services.local.broker.quorum import active_controller
from services.local.broker.runner import metadata_broker_count
from services.local.process import spawn

ROOT = Path(__file__).resolve().parents[2]
NODES = 3
# Small heaps: three JVMs share a 2-core machine with workers, gateways and the tests.
HEAP_MB = 256
START_TIMEOUT_S = 300.0


class ClusterProcess:
    """The cluster command in a subprocess; its output is kept line by line."""

    def __init__(self, data_dir: Path, nodes: int = NODES) -> None:
        self.data_dir = data_dir
        self.size = nodes
        self.base_port = free_port_block(2 * nodes)
        self.ports = list(range(self.base_port, self.base_port + nodes))
        self.bootstrap = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._changed = threading.Condition()

    def start(self) -> None:
        env = {**os.environ, "TOKENRELAY_BROKER_HEAP_MB": str(HEAP_MB), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "services.cli", "broker", "--nodes", str(self.size)]
        argv += ["--port", str(self.base_port), "--data-dir", str(self.data_dir)]
        self.proc = spawn(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True, name="cluster-output").start()
        self.wait_for_line(f"export TOKENRELAY_KAFKA_BOOTSTRAP={self.bootstrap}", START_TIMEOUT_S)
        asyncio.run(self._wait_group_coordinator(START_TIMEOUT_S))

    async def _wait_group_coordinator(self, timeout_s: float) -> None:
        # The first group to ask creates the offsets topic (RF 3): until then coordinators are "not available".
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    await admin.find_coordinator("tokenrelay-test-warmup")
                    return
                except KafkaError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await admin.close()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.lines)

    def wait_for_line(self, text: str, timeout_s: float, occurrences: int = 1) -> None:
        """Until ``occurrences`` output lines contain ``text``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while sum(text in line for line in self.lines) < occurrences:
                if self.proc is not None and self.proc.poll() is not None:
                    raise BrokerError(f"the cluster command exited ({self.proc.returncode}):\n" + self.output())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(f"no {text!r} from the cluster command in {timeout_s:.0f}s:\n" + self.output())
                self._changed.wait(min(remaining, 1.0))

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines[-60:])

    def pid(self, node_id: int) -> int:
        """Pid of a node's JVM: the command's child whose server.properties is in ``node-<id>``."""
        assert self.proc is not None
        marker = str(self.data_dir / f"node-{node_id}" / "server.properties")
        for child in psutil.Process(self.proc.pid).children():
            try:
                if marker in child.cmdline():
                    return int(child.pid)
            except psutil.NoSuchProcess:
                continue
        raise LookupError(f"node {node_id} is not running")

    def kill(self, node_id: int) -> None:
        """SIGKILL one node's JVM."""
        os.kill(self.pid(node_id), signal.SIGKILL)

    def port_of(self, node_id: int) -> int:
        return self.ports[node_id - 1]

    def active_controller(self) -> int:
        for port in self.ports:
            leader = active_controller("127.0.0.1", port)
            if leader is not None:
                return leader
        raise BrokerError("no node names an active controller")

    async def group_coordinator(self, group: str) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            return await admin.find_coordinator(group)
        finally:
            await admin.close()

    async def leaders(self, topic: str) -> dict[int, int]:
        """Leader node of every partition of ``topic``."""
        return {p["partition"]: p["leader"] for p in await self._partitions(topic)}

    async def replication(self, topic: str) -> tuple[int, str]:
        """Replicas per partition (the least over partitions) and the topic's min.insync.replicas config."""
        partitions = await self._partitions(topic)
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        finally:
            await admin.close()
        configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
        return min(len(p["replicas"]) for p in partitions), configs["min.insync.replicas"]

    async def wait_healed(self, topics: list[str], timeout_s: float = 180.0) -> None:
        """Until every node answers with all brokers listed and every partition of ``topics`` is fully in sync."""
        deadline = time.monotonic() + timeout_s
        while True:
            counts = [metadata_broker_count("127.0.0.1", p) for p in self.ports]
            short: list[Any] = []
            if all(c == self.size for c in counts):
                for topic in topics:
                    short += [(topic, p["partition"], p["isr"]) for p in await self._partitions(topic)]
                short = [s for s in short if len(s[2]) < self.size]
                if not short:
                    return
            if time.monotonic() > deadline:
                raise BrokerError(f"cluster not healed in {timeout_s:.0f}s: brokers {counts}, short ISR {short}")
            await asyncio.sleep(0.5)

    async def _partitions(self, topic: str) -> list[dict[str, Any]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
        return list(described["partitions"])

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

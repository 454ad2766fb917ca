"""A KRaft cluster of local broker+controller nodes (`tokenrelay broker --nodes N`) that restarts a node that dies."""

from __future__ import annotations

import functools
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from schemas.errors import BrokerError
from services.local.broker import config, secure
from services.local.broker.runner import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ClusterNode,
    LocalBroker,
    ensure_jars,
    java_binary,
    secure_files,
    secure_ready_lines,
)
from services.local.foreground import Service
from services.local.ports import port_free
from services.settings import Settings

log = logging.getLogger(__name__)

# Node JVMs start together and wait for each other's quorum: allow for three starting at once on a busy machine.
CLUSTER_READY_TIMEOUT_S = 3 * READY_TIMEOUT_S
RESTART_BACKOFF_S = 5.0
# Fixed ports stay below the kernel's ephemeral range: a client reconnecting to a dead node's port could otherwise
# connect to itself on it and keep the node from restarting.
PORT_RANGE = (20_000, 32_000)


def node_ports(base: int, nodes: int) -> tuple[list[int], list[int]]:
    """Client ports ``base .. base+n-1`` and controller ports ``base+n .. base+2n-1`` of an n-node cluster."""
    if nodes < 1:
        raise ValueError(f"a cluster needs at least one node, got {nodes}")
    if base < 1 or base + 2 * nodes - 1 > 65535:
        raise ValueError(f"ports {base}..{base + 2 * nodes - 1} are not all valid TCP ports")
    return list(range(base, base + nodes)), list(range(base + nodes, base + 2 * nodes))


def free_port_block(count: int, rng: random.Random | None = None) -> int:
    """The first of ``count`` consecutive ports that are free now, below the ephemeral range."""
    rng = rng or random.Random()
    low, high = PORT_RANGE
    for _ in range(200):
        base = rng.randrange(low, high - count)
        if all(port_free(config.HOST, p) for p in range(base, base + count)):
            return base
    raise BrokerError(f"no {count} consecutive free ports found in {low}..{high}")


def default_data_dir(settings: Settings, nodes: int) -> Path:
    """Next to the single node's data dir, so that the two never share one."""
    single = Path(settings.broker_data_dir).expanduser()
    return single.with_name(f"{single.name}-{nodes}nodes")


class LocalCluster(Service):
    """``nodes`` KRaft broker+controller JVMs on 127.0.0.1 with one quorum, each with its own data dir under
    ``data_dir/node-<id>``; clients on ports P..P+n-1, controllers on P+n..P+2n-1."""

    def __init__(
        self,
        settings: Settings,
        nodes: int = 3,
        port: int | None = None,
        data_dir: Path | None = None,
        *,
        heap_mb: int | None = None,
        ready_timeout_s: float = CLUSTER_READY_TIMEOUT_S,
        console: bool = True,
        report: Callable[[str], None] | None = None,
        secure: bool = False,
    ) -> None:
        if nodes < 2:
            raise ValueError("a cluster has at least two nodes; use LocalBroker for one")
        self.settings = settings
        self.size = nodes
        self.requested_port = settings.broker_port if port is None else port
        chosen = default_data_dir(settings, nodes) if data_dir is None else data_dir
        self.data_dir = Path(chosen).expanduser().resolve()
        self.heap_mb = settings.broker_heap_mb if heap_mb is None else heap_mb
        self.ready_timeout_s = ready_timeout_s
        self.console = console
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.secure = secure
        self.nodes: dict[int, LocalBroker] = {}
        self.restarts: list[tuple[int, int | None]] = []  # (node id, exit code) of every node restarted
        self.start_seconds: float | None = None
        self._restarting: set[int] = set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # -- public API

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:P,127.0.0.1:P+1,...``: every node's client listener."""
        if not self.nodes:
            raise BrokerError("the local cluster is not started")
        return ",".join(f"{config.HOST}:{node.requested_port}" for node in self.nodes.values())

    def pid(self, node_id: int) -> int | None:
        """Pid of a node's JVM while it runs."""
        return self.nodes[node_id].pid

    def start(self) -> str:
        """Start every node and wait until each lists all of them in its metadata; returns the bootstrap list."""
        with self._lock:
            if self.nodes and all(node.is_running() for node in self.nodes.values()):
                return self.bootstrap
            self._stopping.clear()
            began = time.monotonic()
            java_binary()
            ensure_jars(self.settings)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            base = self.requested_port or free_port_block(2 * self.size)
            clients, controllers = node_ports(base, self.size)
            busy = [p for p in clients + controllers if not port_free(config.HOST, p)]
            if busy:
                raise BrokerError(
                    f"ports {busy} on {config.HOST} are in use: a {self.size}-node cluster at --port {base} needs "
                    f"{base}..{base + 2 * self.size - 1} free; choose another with --port / TOKENRELAY_BROKER_PORT"
                )
            if self.secure:
                secure.ensure_material(secure_files(self.data_dir))  # once, before the nodes start side by side
            voters = {i + 1: port for i, port in enumerate(controllers)}
            cluster_id = self._cluster_id()
            self.nodes = {
                node_id: LocalBroker(
                    self.settings,
                    clients[node_id - 1],
                    self.data_dir / f"node-{node_id}",
                    heap_mb=self.heap_mb,
                    ready_timeout_s=self.ready_timeout_s,
                    console=self.console,
                    node=ClusterNode(node_id, voters, cluster_id),
                    security_dir=secure_files(self.data_dir).directory if self.secure else None,
                )
                for node_id in voters
            }
            # Each node waits for a quorum before it answers, so they start together.
            errors = _in_parallel({f"node {i}": node.start for i, node in self.nodes.items()})
            if errors:
                self._stop_nodes(STOP_TIMEOUT_S)
                raise BrokerError("; ".join(f"{name}: {exc}" for name, exc in errors.items()))
            try:
                self._wait_all_registered(began)
                if self.secure:
                    self.nodes[1].grant_roles()
            except BaseException:
                self._stop_nodes(STOP_TIMEOUT_S)
                raise
            self.start_seconds = time.monotonic() - began
            log.info("Kafka cluster of %d nodes ready on %s in %.1fs", self.size, self.bootstrap, self.start_seconds)
            return self.bootstrap

    def restart_dead_nodes(self) -> list[int]:
        """Start, in the background, every node whose JVM has exited; returns their ids. Reports what it does."""
        started = []
        with self._lock:
            for node_id, node in self.nodes.items():
                if self._stopping.is_set() or node.is_running() or node_id in self._restarting:
                    continue
                code = node.exit_code
                self._restarting.add(node_id)
                self.restarts.append((node_id, code))
                self.report(f"node {node_id} ({node.bootstrap_address}) exited (code {code}); restarting it")
                threading.Thread(target=self._restart, args=(node_id,), name=f"restart-node-{node_id}").start()
                started.append(node_id)
        return started

    def restarting(self) -> bool:
        """Whether a node restart is under way."""
        with self._lock:
            return bool(self._restarting)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every node (SIGTERM to all at once, SIGKILL after ``timeout_s``)."""
        self._stopping.set()
        self._stop_nodes(timeout_s)

    start_error = BrokerError
    title = "the Kafka cluster"

    def abort_start(self) -> None:
        self._stopping.set()

    def ready_lines(self, address: str) -> list[str]:
        took = f"{self.start_seconds or 0:.0f}s"
        lines = [f"Kafka cluster of {self.size} nodes ready in {took} (data: {self.data_dir}): {address}"]
        for node_id, node in self.nodes.items():
            assert node.node is not None
            lines.append(
                f"  node {node_id}: {node.bootstrap_address} (controller {config.HOST}:"
                f"{node.node.controller_port}, pid {node.pid}, log {node.log_file})"
            )
        replicas, min_isr = config.cluster_replication(self.size)
        lines += [
            f"export TOKENRELAY_KAFKA_BOOTSTRAP={address}",
            f"export TOKENRELAY_REPLICATION_FACTOR={replicas}",
            f"export TOKENRELAY_MIN_INSYNC_REPLICAS={min_isr}",
        ]
        first = self.nodes[1]
        if first.files is not None:
            lines += secure_ready_lines(first.files, first.passwords)
        return lines

    def check(self) -> int | None:
        self.restart_dead_nodes()
        return None

    # -- internals

    def _cluster_id(self) -> str:
        id_file = self.data_dir / "cluster.id"
        cluster_id = id_file.read_text().strip() if id_file.exists() else ""
        if not config.is_valid_cluster_id(cluster_id):
            cluster_id = config.new_cluster_id()
            id_file.write_text(cluster_id + "\n")
        return cluster_id

    def _wait_all_registered(self, began: float) -> None:
        deadline = began + self.ready_timeout_s
        while True:
            counts = [n.broker_count() for n in self.nodes.values()]
            if all(count >= self.size for count in counts):
                return
            if self._stopping.is_set():
                raise BrokerError("the Kafka cluster start was interrupted")
            dead = [i for i, n in self.nodes.items() if not n.is_running()]
            if dead or time.monotonic() > deadline:
                why = f"node {dead[0]} exited" if dead else f"not all registered in {self.ready_timeout_s:.0f}s"
                tail = self.nodes[dead[0] if dead else 1].output_tail()
                raise BrokerError(f"the Kafka cluster did not form ({why}; brokers seen: {counts})\n{tail}")
            self._stopping.wait(0.2)

    def _restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        try:
            while not self._stopping.is_set():
                began = time.monotonic()
                try:
                    node.start()
                except BrokerError as exc:
                    if self._stopping.is_set():
                        return
                    self.report(f"node {node_id} failed to restart ({exc.message.splitlines()[0]}); trying again")
                    self._stopping.wait(RESTART_BACKOFF_S)
                    continue
                self.report(
                    f"node {node_id} is back on {node.bootstrap_address} "
                    f"(pid {node.pid}, {time.monotonic() - began:.1f}s)"
                )
                return
        finally:
            with self._lock:
                self._restarting.discard(node_id)

    def _stop_nodes(self, timeout_s: float) -> None:
        # All at once: one by one, the last nodes would wait for a quorum that is already gone.
        _in_parallel({f"node {i}": functools.partial(node.stop, timeout_s) for i, node in self.nodes.items()})


def _in_parallel(calls: dict[str, Callable[[], object]]) -> dict[str, BaseException]:
    """Run every call in a thread of its own and wait for all; returns the exceptions by name."""
    errors: dict[str, BaseException] = {}

    def run(name: str, call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:
            errors[name] = exc

    threads = [threading.Thread(target=run, args=item, name=item[0]) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors

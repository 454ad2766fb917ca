"""Resolve the broker's jars with Maven and run a KRaft Kafka broker (one node, or a node of a cluster) in a JVM."""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

from schemas.errors import BrokerError, MissingToolError
from services.local.broker import config, secure
from services.local.foreground import Service
from services.local.ports import port_free
from services.local.process import die_with_parent, spawn, terminate
from services.logs import configure_logging
from services.settings import Settings

log = logging.getLogger(__name__)

POM = Path(__file__).with_name("pom.xml")
MIN_JAVA = 17
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------- tools


def java_binary() -> str:
    """Path of ``java`` (``$JAVA_HOME/bin/java`` first); MissingToolError if there is none or it is too old."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = str(Path(java_home) / "bin" / "java") if java_home else None
    java = candidate if candidate and os.access(candidate, os.X_OK) else shutil.which("java")
    if java is None:
        raise MissingToolError(
            f"`java` not found: the local Kafka broker needs a JDK {MIN_JAVA}+ "
            "(e.g. `apt-get install openjdk-17-jdk-headless`, or set JAVA_HOME)"
        )
    version = _java_major_version(java)
    if version is not None and version < MIN_JAVA:
        raise MissingToolError(f"{java} is Java {version}; Kafka 4 needs Java {MIN_JAVA}+ (install a newer JDK)")
    return java


@lru_cache(maxsize=8)
def _java_major_version(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match is None:
        return None
    major = int(match.group(1))
    # Java 8 and older report "1.x".
    return int(match.group(2) or 0) if major == 1 else major


def mvn_binary() -> str:
    """Path of ``mvn``; MissingToolError if Maven is not installed."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MissingToolError(
            "`mvn` not found: the local Kafka broker's jars are resolved with Maven "
            "(e.g. `apt-get install maven`); or point TOKENRELAY_KAFKA_BOOTSTRAP at an existing broker"
        )
    return mvn


# ---------------------------------------------------------------------------------------------- jars


def kafka_version(pom: Path = POM) -> str:
    """The ``kafka.version`` property of the broker's pom.xml."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise BrokerError(f"{pom} has no <kafka.version> property")
    return (node.text or "").strip()


def classpath_file(settings: Settings, pom: Path = POM) -> Path:
    """Where the resolved classpath of ``pom`` is cached."""
    return settings.cache_dir / "broker" / f"kafka-{kafka_version(pom)}.classpath"


def ensure_jars(settings: Settings, *, pom: Path = POM, quiet: bool = False) -> str:
    """The broker's Java classpath; the first call resolves it with Maven (downloads jars to ~/.m2)."""
    target = classpath_file(settings, pom)
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = target.with_suffix(".pom-sha256")
    cached = _read_classpath(target, stamp, digest)
    if cached is not None:
        return cached
    target.parent.mkdir(parents=True, exist_ok=True)
    # One resolution at a time across processes (parallel test sessions, `make install` + `tokenrelay up`).
    with open(target.parent / ".resolve.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_classpath(target, stamp, digest)
        if cached is not None:
            return cached
        _resolve(pom, target, quiet=quiet)
        stamp.write_text(digest + "\n")
    classpath = _read_classpath(target, stamp, digest)
    if classpath is None:
        raise BrokerError(f"Maven wrote no usable classpath to {target}")
    return classpath


def _read_classpath(target: Path, stamp: Path, digest: str) -> str | None:
    try:
        if stamp.read_text().strip() != digest:
            return None
        classpath = target.read_text().strip()
    except OSError:
        return None
    jars = classpath.split(os.pathsep) if classpath else []
    # A cleaned ~/.m2 invalidates the cache.
    if not jars or not all(os.path.isfile(jar) for jar in jars):
        return None
    return classpath


def maven_argv(mvn: str, pom: Path, output: Path) -> list[str]:
    """``mvn dependency:build-classpath`` without progress, colours or INFO lines: it prints only errors."""
    return [
        mvn,
        "--batch-mode",
        "--quiet",
        "--no-transfer-progress",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        "dependency:build-classpath",
        f"-Dmdep.outputFile={output}",
    ]


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (Maven 3.8 writes some even in batch mode)."""
    return _ANSI.sub("", text)


def _resolve(pom: Path, target: Path, *, quiet: bool) -> None:
    mvn = mvn_binary()
    java_binary()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    argv = maven_argv(mvn, pom, tmp)
    if not quiet:
        print("resolving Kafka jars from Maven Central (first time only)…", end="", file=sys.stderr, flush=True)
    log.info("running %s", " ".join(argv))
    began = time.monotonic()
    try:
        # Maven's output is kept and shown only when it fails.
        result = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, check=False
        )
        if result.returncode != 0:
            if not quiet:
                print(" failed", file=sys.stderr, flush=True)
            tail = "\n".join(strip_ansi(result.stdout or "").splitlines()[-40:])
            raise BrokerError(f"`mvn dependency:build-classpath` failed (exit {result.returncode})\n{tail}".rstrip())
        os.replace(tmp, target)
        if not quiet:
            print(f" done in {time.monotonic() - began:.0f}s", file=sys.stderr, flush=True)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- broker


def free_port(host: str = config.HOST) -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def jvm_options(heap_mb: int) -> list[str]:
    """JVM flags for a small, quick-starting broker."""
    return [
        f"-Xmx{heap_mb}m",
        # Start small and grow up to -Xmx: an idle broker then keeps a small RSS.
        f"-Xms{min(heap_mb, 64)}m",
        "-Xss512k",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-XX:ReservedCodeCacheSize=64m",
        "-XX:MaxMetaspaceSize=128m",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        "-Dfile.encoding=UTF-8",
    ]


@dataclass(frozen=True)
class ClusterNode:
    """What makes a LocalBroker one node of a cluster: its id, every voter's controller port, the shared cluster id."""

    node_id: int
    voters: Mapping[int, int]
    cluster_id: str

    @property
    def controller_port(self) -> int:
        return self.voters[self.node_id]


class LocalBroker(Service):
    """A KRaft Kafka broker (broker+controller) in a child JVM on 127.0.0.1: a single node, or a node of a cluster.

    A single node runs in a process group of its own; a cluster node stays in ours (so that the whole command can be
    signalled as one group) with SIGINT ignored, so that a terminal's Ctrl-C reaches only us and we stop it in order.
    """

    def __init__(
        self,
        settings: Settings,
        port: int | None = None,
        data_dir: Path | None = None,
        *,
        heap_mb: int | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        console: bool = True,
        node: ClusterNode | None = None,
        secure: bool = False,
        security_dir: Path | None = None,
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.requested_port = settings.broker_port if port is None else port
        self.data_dir = Path(settings.broker_data_dir if data_dir is None else data_dir).expanduser().resolve()
        self.heap_mb = settings.broker_heap_mb if heap_mb is None else heap_mb
        self.ready_timeout_s = ready_timeout_s
        self.console = console
        # SASL_SSL with SCRAM users per role and ACLs; a cluster's nodes share one security_dir.
        self.files = secure_files(self.data_dir, security_dir) if secure or security_dir else None
        self.extra_properties = dict(extra_properties or {})  # server.properties keys on top (tests)
        self.passwords: dict[str, str] = {}
        self.port: int | None = None
        self.controller_port: int | None = None
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._waiter: threading.Thread | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._abort = threading.Event()
        self._lock = threading.Lock()

    # -- public API

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>`` of the running broker."""
        if self.port is None:
            raise BrokerError("the local broker is not started")
        return f"{config.HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        """The broker's own log (INFO and above)."""
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        """Pid of the broker JVM while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """Exit code of the JVM if it exited on its own (None while it runs or when it was never started)."""
        proc = self._proc
        return None if proc is None else proc.poll()

    @property
    def bootstrap_address(self) -> str:
        """``127.0.0.1:<port>`` this broker listens on (or will, when its port was given), running or not."""
        return f"{config.HOST}:{self.port or self.requested_port}"

    def start(self) -> str:
        """Start the broker and wait until it answers metadata; returns the bootstrap address."""
        with self._lock:
            if self.is_running():
                return self.bootstrap
            self._abort.clear()
            began = time.monotonic()
            java = java_binary()
            classpath = ensure_jars(self.settings)
            port = self.requested_port or free_port()
            if not port_free(config.HOST, port):
                raise BrokerError(
                    f"port {port} on {config.HOST} is already in use: another broker running? "
                    "choose another with --port / TOKENRELAY_BROKER_PORT"
                )
            if self.node is None:
                controller_port = free_port()
                while controller_port == port:
                    controller_port = free_port()
            else:
                controller_port = self.node.controller_port
                if not port_free(config.HOST, controller_port):
                    raise BrokerError(f"controller port {controller_port} on {config.HOST} is already in use")
            self.data_dir.mkdir(parents=True, exist_ok=True)
            extra: dict[str, str] = {}
            if self.files is not None:
                self.passwords = secure.ensure_material(self.files)
                extra = secure.server_properties(self.files, self.passwords, port, controller_port)
            extra.update(self.extra_properties)
            properties = self.data_dir / "server.properties"
            properties.touch(mode=0o600)
            properties.chmod(0o600)  # the broker's own SCRAM password when secure
            properties.write_text(
                config.render_server_properties(
                    port=port,
                    controller_port=controller_port,
                    data_dir=self.data_dir,
                    node_id=self.node.node_id if self.node else config.NODE_ID,
                    voters=self.node.voters if self.node else None,
                    extra=extra,
                )
            )
            log4j = self.data_dir / "log4j2.xml"
            log4j.write_text(config.render_log4j2_xml(self.log_file))
            base = [java, *jvm_options(self.heap_mb), f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
            self._format_storage(base, properties)
            self.port, self.controller_port = port, controller_port
            self._spawn([*base, "kafka.Kafka", str(properties)])
            try:
                self._wait_ready(began)
            except BaseException:
                self._terminate()
                self.port = None
                raise
            if self.files is not None and self.node is None:
                self.grant_roles()
            self.start_seconds = time.monotonic() - began
            log.info(
                "Kafka broker ready on %s in %.1fs (data in %s)", self.bootstrap, self.start_seconds, self.data_dir
            )
            return self.bootstrap

    def client_settings(self, user: str, base: Settings | None = None) -> Settings:
        """Settings of a client of this (secure) broker connecting as ``user`` (admin or a role)."""
        if self.files is None:
            raise BrokerError("the local broker is not secure: it has no users")
        base = dataclasses.replace(base or self.settings, kafka_bootstrap=self.bootstrap_address)
        return secure.client_settings(base, self.files, self.passwords, user)

    def grant_roles(self, settings: Settings | None = None, models: Sequence[str] | None = None) -> int:
        """Create the roles' ACLs (for the prefix of ``settings`` and its served model, unless ``models`` are given)
        as the admin; idempotent."""
        from services.acls import apply_acls

        settings = settings or self.settings
        admin = self.client_settings(secure.ADMIN, settings)
        principals = {role: f"User:{role}" for role in secure.ROLES}
        return apply_acls(admin, principals, models or [settings.served_model])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the broker: SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``; returns its exit code."""
        self._abort.set()
        with self._lock:
            code = self._terminate(timeout_s)
            self.port = None
            return code

    start_error = BrokerError
    title = "the Kafka broker"

    def abort_start(self) -> None:
        self._abort.set()

    def ready_lines(self, address: str) -> list[str]:
        lines = [
            f"Kafka broker ready on {address} (data: {self.data_dir}, log: {self.log_file})",
            f"export TOKENRELAY_KAFKA_BOOTSTRAP={address}",
        ]
        if self.files is not None:
            lines += secure_ready_lines(self.files, self.passwords)
        return lines

    def check(self) -> int | None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return None
        code = proc.returncode if proc is not None else 1
        print(f"Kafka broker exited on its own (code {code}); see {self.log_file}", file=sys.stderr)
        return code or 1

    def output_tail(self, lines: int = 40) -> str:
        """The last lines of the broker's console output and log file, for error messages."""
        parts = []
        console = list(self._output)[-lines:]
        if console:
            parts.append("--- broker console ---\n" + "".join(console).rstrip())
        with contextlib.suppress(OSError):
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"--- {self.log_file} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # -- internals

    def _answers(self) -> bool:
        return self.broker_count() > 0

    def broker_count(self) -> int:
        """How many live brokers this node lists in its metadata (0 when it does not answer); as the admin when
        secure."""
        if self.files is None:
            return metadata_broker_count(config.HOST, self.port or self.requested_port)
        admin = self.client_settings(secure.ADMIN)
        return secure_broker_count(dataclasses.replace(admin, kafka_bootstrap=self.bootstrap_address))

    def _format_storage(self, base: Sequence[str], properties: Path) -> None:
        if (self.data_dir / "logs" / "meta.properties").exists():
            return
        if self.node is not None:
            cluster_id = self.node.cluster_id
        else:
            id_file = self.data_dir / "cluster.id"
            cluster_id = id_file.read_text().strip() if id_file.exists() else ""
            if not config.is_valid_cluster_id(cluster_id):
                cluster_id = config.new_cluster_id()
                id_file.write_text(cluster_id + "\n")
        argv = [
            *base,
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",  # one argument: a random id may begin with '-', which is not a flag
            "-c",
            str(properties),
            "--ignore-formatted",
            *(secure.scram_arguments(self.passwords) if self.files is not None else ()),
        ]
        log.info("formatting Kafka storage in %s (cluster id %s)", self.data_dir, cluster_id)
        result = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            check=False,
            preexec_fn=die_with_parent(),
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage in {self.data_dir} failed:\n{result.stdout.strip()}")

    def _spawn(self, argv: list[str]) -> None:
        self._output.clear()
        in_our_group = self.node is not None

        def preexec() -> None:
            if in_our_group:
                # An ignored SIGINT stays ignored across exec, and the JVM then installs no handler for it.
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        try:
            proc: subprocess.Popen[str] = spawn(
                argv,
                preexec=preexec,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                # A single node gets its own process group: a terminal's Ctrl-C reaches only us, and we stop the
                # broker last.
                process_group=None if in_our_group else 0,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BrokerError(f"cannot start the broker JVM: {exc}") from exc

        def pump() -> None:
            assert proc.stdout is not None
            with proc.stdout:
                self._pump(proc.stdout)
            proc.wait()

        waiter = threading.Thread(target=pump, name="kafka-broker", daemon=True)
        waiter.start()
        self._proc, self._waiter = proc, waiter
        _live.add(self)

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._output.append(line)
            if self.console:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(line)
                    sys.stderr.flush()

    def _wait_ready(self, began: float) -> None:
        assert self.port is not None
        deadline = began + self.ready_timeout_s
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise BrokerError(f"the Kafka broker exited during start (code {code})\n{self.output_tail()}")
            if self._abort.is_set():
                raise BrokerError("the Kafka broker start was interrupted")
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the Kafka broker did not answer metadata on {config.HOST}:{self.port} "
                    f"within {self.ready_timeout_s:.0f}s\n{self.output_tail()}"
                )
            self._abort.wait(0.1)

    def _terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        proc, waiter = self._proc, self._waiter
        if proc is None:
            return None
        code = terminate(proc, timeout_s, "Kafka broker")
        if waiter is not None:
            waiter.join(5)
        self._proc = self._waiter = None
        _live.discard(self)
        return code


_live: set[LocalBroker] = set()


@atexit.register
def _stop_all() -> None:
    for broker in list(_live):
        with contextlib.suppress(Exception):
            broker.stop()


# ---------------------------------------------------------------------------------------------- readiness


def secure_files(data_dir: Path, security_dir: Path | None = None) -> secure.SecureFiles:
    return secure.SecureFiles(security_dir or data_dir / "security")


def secure_ready_lines(files: secure.SecureFiles, passwords: Mapping[str, str]) -> list[str]:
    """What a secure broker or cluster prints: the admin's client settings, each role's user, the Java tools' file."""
    for user in secure.USERS:
        write_client_properties(files, user, passwords[user])
    lines = [
        f"SASL_SSL with {secure.MECHANISM}, ACLs on; CA {files.ca_cert}; passwords in {files.credentials}",
        "# as the admin: topics, ACLs, `tokenrelay up`; the Java tools take "
        f"--command-config {files.client_properties(secure.ADMIN)}",
        *secure.env_lines(files, secure.ADMIN, passwords[secure.ADMIN]),
        "# each component as its role (same settings, another user):",
    ]
    lines += [
        f"#   {role:9} TOKENRELAY_KAFKA_SASL_USERNAME={role} TOKENRELAY_KAFKA_SASL_PASSWORD={passwords[role]}"
        for role in secure.ROLES
    ]
    return lines


def write_client_properties(files: secure.SecureFiles, user: str, password: str) -> Path:
    """``<security dir>/<user>.properties``: the Java client properties (kafka tools' --command-config)."""
    from services.kafka_auth import java_client_properties

    settings = Settings(**secure.client_fields(files, user, password))  # type: ignore[arg-type]
    target = files.client_properties(user)
    target.touch(mode=0o600)
    target.chmod(0o600)
    target.write_text(config.render_properties(java_client_properties(settings)))
    return target


def secure_broker_count(settings: Settings, timeout_s: float = 2.0) -> int:
    """How many live brokers a SASL/TLS cluster lists to the client of ``settings`` (0 when it does not answer)."""
    from confluent_kafka import KafkaException

    from services.kafka_auth import confluent_admin

    client = confluent_admin(settings)
    try:
        return len(client.list_topics(timeout=timeout_s).brokers)
    except KafkaException:
        return 0


def metadata_ready(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether a Kafka broker at host:port answers a Metadata request listing at least one broker."""
    return metadata_broker_count(host, port, timeout_s) > 0


def metadata_broker_count(host: str, port: int, timeout_s: float = 2.0) -> int:
    """How many live brokers the broker at host:port lists in a Metadata answer (0 when it does not answer)."""
    body = kafka_round_trip(host, port, _metadata_request(correlation_id=1), timeout_s)
    return 0 if body is None else _metadata_broker_count(body, correlation_id=1)


def kafka_round_trip(host: str, port: int, request: bytes, timeout_s: float) -> bytes | None:
    """Send one size-framed Kafka request and return the response body; None when the broker does not answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(request)
            (size,) = struct.unpack(">i", recv_exact(sock, 4))
            return recv_exact(sock, size)
    except (OSError, ConnectionError, struct.error):
        return None


def _metadata_request(correlation_id: int) -> bytes:
    # Metadata v4 (Kafka 4 dropped v0-v3), non-flexible header v1; topics=null asks for all topics.
    client_id = b"tokenrelay-ready"
    header = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body = struct.pack(">i?", -1, False)
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def _metadata_broker_count(body: bytes, correlation_id: int) -> int:
    # Response: correlation_id int32, throttle_time_ms int32, brokers array (int32 count, ...).
    if len(body) < 12:
        return 0
    got, _throttle, count = struct.unpack(">iii", body[:12])
    return count if got == correlation_id else 0


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks += chunk
    return bytes(chunks)


# ---------------------------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def running_broker(settings: Settings, port: int | None = None, data_dir: Path | None = None) -> Iterator[str]:
    """Context manager yielding the bootstrap address of a started local broker."""
    with LocalBroker(settings, port, data_dir) as broker:
        yield broker.bootstrap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.local.broker.runner [--resolve-only] [--port P] [--data-dir D]``."""
    parser = argparse.ArgumentParser(prog="python -m services.local.broker.runner", description=__doc__)
    parser.add_argument("--resolve-only", action="store_true", help="resolve and cache the broker jars, then exit")
    parser.add_argument("--port", type=int, default=None, help="broker port (0 = any free port)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data directory (persists across restarts)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings)
    try:
        if args.resolve_only:
            classpath = ensure_jars(settings)
            print(
                f"Kafka {kafka_version()} jars ready ({len(classpath.split(os.pathsep))} jars, "
                f"classpath cached in {classpath_file(settings)})"
            )
            return 0
        return LocalBroker(settings, args.port, args.data_dir).run_foreground()
    except BrokerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

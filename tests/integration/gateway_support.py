"""Helpers of the gateway integration tests: gateway and worker subprocesses, scripted events, SSE reads."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from gateway.sse import parse
from schemas.codec import default_codec
from schemas.records import Delta, Finished, Started, TokenEvent, Usage
from services.kafka import make_producer, record_headers, start_client
from services.localbroker.runner import free_port
from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TOKENRELAY_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        TOKENRELAY_TOPIC_PREFIX=settings.topic_prefix,
        TOKENRELAY_EVENTS_PARTITIONS=str(settings.events_partitions),
        TOKENRELAY_REQUESTS_PARTITIONS=str(settings.requests_partitions),
        TOKENRELAY_GATEWAY_PORT=str(settings.gateway_port),
        TOKENRELAY_HUB_MEMORY_EVENTS=str(settings.hub_memory_events),
        TOKENRELAY_KEEPALIVE_S=str(settings.keepalive_s),
        TOKENRELAY_MAX_BODY_BYTES=str(settings.max_body_bytes),
        TOKENRELAY_API_KEYS=",".join(settings.api_keys),
        TOKENRELAY_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def gateway_settings(bootstrap: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "topic_prefix": prefix,
        "events_partitions": 2,
        "requests_partitions": 2,
        "gateway_port": free_port(),
        "hub_memory_events": 4,
        "keepalive_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class GatewayProcess:
    """`python -m gateway.main` in a subprocess; kill -9 and start again on the same port."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{settings.gateway_port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.main"], cwd=ROOT, env=env_of(self.settings))
        deadline = time.monotonic() + timeout_s
        import urllib.request

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("gateway not ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def running_gateway(settings: Settings) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(settings)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@contextlib.contextmanager
def running_worker(settings: Settings, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.main"],
        cwd=ROOT,
        env=env_of(settings, TOKENRELAY_WORKER_METRICS_PORT="0", **env),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def scripted_stream(rid: str, n: int, run: str = "run-1") -> list[TokenEvent]:
    now = int(time.time() * 1000)
    events = [TokenEvent(rid, run, 0, now, Started("scripted", "scripted-model", 4, 1))]
    events += [TokenEvent(rid, run, i, now, Delta(f" w{i}", (i,))) for i in range(1, n + 1)]
    events.append(TokenEvent(rid, run, n + 1, now, Finished("length", Usage(4, n))))
    return events


class EventWriter:
    """A scripted event source: publishes TokenEvents to the real events topic, as a worker would."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer = make_producer(settings)

    async def __aenter__(self) -> EventWriter:
        await start_client(self.producer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def publish(self, *events: TokenEvent) -> None:
        for ev in events:
            ev = TokenEvent(ev.request_id, ev.run_id, ev.seq, int(time.time() * 1000), ev.payload)
            await self.producer.send(
                self.settings.events_topic,
                default_codec().encode(ev),
                key=ev.request_id.encode(),
                headers=record_headers("TokenEvent"),
            )
        await self.producer.flush()


async def read_sse(
    session: aiohttp.ClientSession,
    url: str,
    *,
    cursor: str | None = None,
    limit: int | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, list[dict[str, str]]]:
    """Status and events of one SSE read: until the terminal event, `limit` events, or the end of the body."""
    hdrs = dict(headers or {})
    if cursor is not None:
        hdrs["Last-Event-ID"] = cursor
    events: list[dict[str, str]] = []
    async with session.get(url, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
        if response.status != 200:
            return response.status, events
        buffer = ""
        async for chunk in response.content.iter_any():
            buffer += chunk.decode()
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                parsed = parse(block + "\n\n")
                events += [e for e in parsed if "event" in e]
                if (limit is not None and len(events) >= limit) or (
                    events and events[-1]["event"] in ("done", "error")
                ):
                    return 200, events[:limit] if limit is not None else events
    return 200, events

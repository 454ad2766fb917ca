"""Helpers of the gateway integration tests: gateway and worker subprocesses, scripted events, SSE reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.fanout.sse import parse
from schemas.codec import default_codec
from schemas.errors import DecodeError
from schemas.records import Delta, Finished, Started, TokenEvent, Usage
from services.kafka import make_consumer, make_producer, read_to_end, record_headers, start_client
from services.local.broker.cluster import free_port_block
from services.local.process import quiet_env, spawn
from services.local.readiness import gateway_serving
from services.settings import Settings
from tests.integration.secure_support import as_role, secured, security
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def gateway_settings(bootstrap: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "topic_prefix": prefix,
        "events_partitions": 2,
        "requests_partitions": 2,
        # Below the ephemeral range: a client reconnecting to a restarted gateway could otherwise connect to
        # itself on its port and keep the gateway from binding it again.
        "gateway_port": free_port_block(1),
        "hub_memory_events": 4,
        "keepalive_s": 1.0,
    }
    values.update(security(bootstrap))
    values.update(overrides)
    return secured(Settings(**values))  # type: ignore[arg-type]


class GatewayProcess:
    """`python -m gateway.main` in a subprocess; kill -9 and start again on the same port."""

    def __init__(self, settings: Settings, *, nofile: int | None = None, log_path: Path | None = None, **env: str):
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{settings.gateway_port}"
        self.nofile = nofile  # open-file limit (soft and hard) of the gateway process
        self.log_path = log_path  # where its stderr goes (inherited when None)
        self.env = env

    def _preexec(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def launch(self) -> None:
        """Start the process and return at once (``start`` or ``start_async`` also wait until it is ready)."""
        stderr = open(self.log_path, "ab") if self.log_path is not None else None  # noqa: SIM115 - the child keeps it
        try:
            self.proc = spawn(
                [sys.executable, "-m", "gateway.main"],
                cwd=ROOT,
                env=quiet_env(as_role(self.settings, "gateway"), **self.env),
                stderr=stderr,
                preexec=self._preexec,
            )
        finally:
            if stderr is not None:
                stderr.close()

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.proc.returncode}")

    def start(self, timeout_s: float = 60.0) -> None:
        """Launch and block until the gateway serves (/readyz 200, or 503 only for want of a worker)."""
        self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._alive()
            if gateway_serving(self.url):
                return
            time.sleep(0.1)
        self.kill()  # not left running behind a failed test
        raise RuntimeError("gateway not ready")

    async def wait_serving(self, timeout_s: float = 60.0) -> None:
        """Until /readyz answers 200: this gateway has read a live model's announcement."""

        async def ready() -> bool:
            return await asyncio.to_thread(gateway_serving, self.url, model_served=True)

        await wait_until(ready, f"gateway on {self.url} serving a model", timeout_s=timeout_s, interval_s=0.1)

    async def start_async(self, timeout_s: float = 60.0) -> None:
        """Launch at once (so that ``stop`` always finds the process), then wait until /readyz answers 200."""
        self.launch()

        async def ready() -> bool:
            self._alive()
            return await asyncio.to_thread(gateway_serving, self.url)

        await wait_until(ready, f"gateway on {self.url} ready", timeout_s=timeout_s, interval_s=0.1)

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
def running_worker(settings: Settings, module: str = "workers.main", **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker subprocess (``python -m module``), yielded once it has announced its model (so that gateways route
    to it)."""
    from tests.integration.worker_helpers import wait_announced, worker_process

    with worker_process(settings, module, **{"TOKENRELAY_WORKER_METRICS_PORT": "0", **env}) as proc:
        served = Settings.from_env(quiet_env(settings, **env)).served_model
        _in_thread(wait_announced(settings, served, proc=proc))
        yield proc


def _in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end on a loop of its own (the caller may be a sync context manager inside a loop)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # its coroutine has a deadline; exit never waits for it
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def metric(session: aiohttp.ClientSession, base_url: str, name: str) -> float:
    """The samples called ``name`` on a gateway's /metrics, summed over their labels (a counter's sample ends in
    ``_total``); 0 when there are none."""
    async with session.get(f"{base_url}/metrics") as response:
        text = await response.text()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def wait_subscribers(
    session: aiohttp.ClientSession, base_url: str, count: int, timeout_s: float = 60.0, *, at_most: bool = False
) -> None:
    """Until the gateway's hub has ``count`` subscriptions attached (at least, or with ``at_most`` at most): from
    then on each gets every live event."""

    async def reached() -> bool:
        attached = await metric(session, base_url, "tokenrelay_gateway_subscribers")
        return attached <= count if at_most else attached >= count

    await wait_until(
        reached, f"{'at most' if at_most else 'at least'} {count} subscribers attached", timeout_s=timeout_s
    )


async def wait_partitions_shared(
    session: aiohttp.ClientSession, bases: list[str], partitions: int, timeout_s: float = 90.0
) -> None:
    """Until the group has given every one of the events topic's ``partitions`` to exactly one of these gateways,
    and each reads some."""
    owned: list[float] = []

    async def shared() -> bool:
        nonlocal owned
        owned = [await metric(session, base, "tokenrelay_gateway_owned_partitions") for base in bases]
        return sum(owned) == partitions and all(owned)

    await wait_until(shared, lambda: f"partitions owned per gateway: {owned}", timeout_s=timeout_s, interval_s=0.2)


async def wait_log_grows(settings: Settings, by: int, timeout_s: float = 60.0) -> None:
    """Until ``by`` more records are in the events topic than when called (a worker is producing)."""
    from aiokafka import TopicPartition

    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        partitions = [TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)]
        start = sum((await consumer.end_offsets(partitions)).values())

        async def grown() -> bool:
            return sum((await consumer.end_offsets(partitions)).values()) >= start + by

        await wait_until(grown, f"{by} more records in {settings.events_topic}", timeout_s=timeout_s, interval_s=0.1)
    finally:
        await consumer.stop()


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


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 exchange with raw bytes (headers that no client library would send)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    header_block, _, payload = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


# --- fault-test helpers: an EventSource-like follower, the log as the truth, loss/duplicate tallies ---------------

TERMINAL_EVENTS = ("done", "error")


@dataclass
class Followed:
    """What one EventSource-like client saw of a stream, over all its connections."""

    events: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0
    cuts: int = 0
    errors: int = 0
    statuses: list[int] = field(default_factory=list)
    ended_204: bool = False

    @property
    def complete(self) -> bool:
        return bool(self.events) and self.events[-1].get("event") in TERMINAL_EVENTS


async def follow_sse(
    session: aiohttp.ClientSession,
    url: str,
    *,
    cut_bytes: Sequence[int] = (),
    cursor: str | None = None,
    retry_s: float = 0.1,
    deadline_s: float = 120.0,
    headers: dict[str, str] | None = None,
    on_event: Callable[[dict[str, str]], None] | None = None,
) -> Followed:
    """Read a stream to its terminal event as a browser's EventSource would, reconnecting with Last-Event-ID.

    ``cut_bytes[i]`` cuts connection i after exactly that many body bytes (possibly mid-event: a partial event
    is dropped, as EventSource drops it). Connection errors, bodies that end early and non-200 answers are
    retried with the last id until ``deadline_s``; a 204 ends the stream (the cursor was at its terminal event).
    ``on_event`` sees every event as it arrives.
    """
    out = Followed()
    last_id = cursor
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        hdrs = dict(headers or {})
        if last_id is not None:
            hdrs["Last-Event-ID"] = last_id
        budget = cut_bytes[out.connections] if out.connections < len(cut_bytes) else None
        out.connections += 1
        try:
            async with session.get(url, headers=hdrs, timeout=aiohttp.ClientTimeout(total=60, sock_read=30)) as resp:
                out.statuses.append(resp.status)
                if resp.status == 204:
                    out.ended_204 = True
                    return out
                if resp.status != 200:
                    await resp.read()
                    await asyncio.sleep(retry_s)
                    continue
                buffer = b""
                received = 0
                async for chunk in resp.content.iter_any():
                    if budget is not None and received + len(chunk) >= budget:
                        chunk = chunk[: budget - received]
                    received += len(chunk)
                    buffer += chunk
                    end = buffer.rfind(b"\n\n")
                    if end >= 0:
                        complete, buffer = buffer[: end + 2], buffer[end + 2 :]
                        for ev in parse(complete.decode()):
                            if "id" in ev:
                                last_id = ev["id"]
                            if "event" in ev:
                                out.events.append(ev)
                                if on_event is not None:
                                    on_event(ev)
                                if ev["event"] in TERMINAL_EVENTS:
                                    return out
                    if budget is not None and received >= budget:
                        out.cuts += 1
                        resp.close()  # drop the connection mid-stream, maybe mid-event
                        break
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            out.errors += 1
            await asyncio.sleep(retry_s)
    return out


async def read_log_streams(settings: Settings, request_ids: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    """The SSE events each request's log implies, built straight from the events topic (not through a gateway)."""
    from gateway.fanout.subscription import make_out
    from schemas.view import View

    wanted = set(request_ids)
    consumer = make_consumer(settings)
    await start_client(consumer)
    views: dict[str, View] = {rid: View(rid) for rid in wanted}
    streams: dict[str, list[dict[str, str]]] = {rid: [] for rid in wanted}
    try:
        async for tp, r in read_to_end(consumer, settings.events_topic, settings.events_partitions):
            rid = r.key.decode("utf-8", "replace") if r.key else ""
            if rid in wanted and r.value is not None:
                try:
                    ev = default_codec().decode_event(r.value)
                except DecodeError:
                    continue
                view_event = views[rid].feed(r.offset, ev)
                if view_event is not None:
                    framed = make_out(tp.partition, rid, view_event).framed.decode()
                    streams[rid] += [e for e in parse(framed) if "event" in e]
    finally:
        await consumer.stop()
    return streams


@dataclass
class Tally:
    """Lost and duplicated tokens of a stream, counted by (run_id, seq) and by text, against an expected stream."""

    lost: int = 0
    duplicated: int = 0
    lost_events: int = 0
    duplicated_events: int = 0
    text_mismatch: int = 0
    usage_mismatch: int = 0
    incomplete: int = 0
    tokens: int = 0
    streams: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def clean(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.lost_events
            or self.duplicated_events
            or self.text_mismatch
            or self.usage_mismatch
            or self.incomplete
        )


def token_keys(events: Sequence[dict[str, str]]) -> list[tuple[str, int, str, int]]:
    """(run_id, seq, text, token count) of every token event, following started/restart for the run."""
    run = ""
    keys = []
    for ev in events:
        data = json.loads(ev.get("data", "null"))
        if ev.get("event") in ("started", "restart"):
            run = data["run_id"]
        elif ev.get("event") == "token":
            keys.append((run, int(data["seq"]), data["text"], len(data["token_ids"])))
    return keys


def stream_text(events: Sequence[dict[str, str]]) -> str:
    return "".join(text for _, _, text, _ in token_keys(events))


def tally(received: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]) -> Tally:
    """Compare what a client received with the expected stream (the log's, or an uninterrupted read)."""
    got = Counter((run, seq) for run, seq, _, _ in token_keys(received))
    want = Counter((run, seq) for run, seq, _, _ in token_keys(expected))
    got_ids = Counter(ev.get("id") for ev in received)
    want_ids = Counter(ev.get("id") for ev in expected)
    result = Tally(streams=1, tokens=sum(n for _, _, _, n in token_keys(received)))
    result.lost = sum((want - got).values())
    result.duplicated = sum((got - want).values())
    result.lost_events = sum((want_ids - got_ids).values())
    result.duplicated_events = sum((got_ids - want_ids).values())
    result.text_mismatch = int(stream_text(received) != stream_text(expected))
    result.incomplete = int(not received or received[-1].get("event") not in TERMINAL_EVENTS)
    if received and received[-1].get("event") == "done":
        usage = json.loads(received[-1]["data"])["usage"]
        result.usage_mismatch = int(usage["completion_tokens"] != result.tokens)
    return result

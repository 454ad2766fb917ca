"""Fault test: subscribers that stop reading are disconnected with a resumable cursor; gateway memory stays bounded.

Slow clients are raw sockets with a tiny receive buffer that read the first event and then stop reading. The
gateway must cut them loose (their bounded queue overflows), keep serving fast subscribers of the same request at
full speed, keep its RSS bounded, and the last complete event a slow client received must be a cursor that resumes
to exactly the whole stream.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import aiohttp
import psutil
import pytest

from gateway.fanout.sse import parse
from schemas.ids import new_request_id
from schemas.records import Delta, Finished, Started, TokenEvent, Usage
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    EventWriter,
    Tally,
    follow_sse,
    gateway_settings,
    metric,
    read_log_streams,
    running_gateway,
    tally,
    wait_subscribers,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SUBSCRIBER_BUFFER = 128
CHUNK = 16  # events per producer flush: a worker's pace, not one burst bigger than a subscriber's buffer
N_SLOW = 50
N_FAST = 5
ROUNDS = 4
EVENTS_PER_ROUND = 200
TEXT_BYTES = 8192
MB = 1 << 20


class SlowClient:
    """An SSE reader over a raw socket (HTTP/1.0, so the body is unchunked) with a tiny receive window."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes):
        self.reader = reader
        self.writer = writer
        self.body = head

    @classmethod
    async def connect(cls, port: int, path: str) -> SlowClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
        client = cls(reader, writer, b"")
        while b"event: started" not in client.body:  # read the first event, then stop reading
            client.body += await reader.readuntil(b"\n\n")
        return client

    async def read_rest(self, timeout_s: float = 60.0) -> list[dict[str, str]]:
        """Read what is left until the gateway closes the connection; the complete events received in all."""
        rest = await asyncio.wait_for(self.reader.read(), timeout_s)
        self.writer.close()
        body = (self.body + rest).decode()
        complete = body[: body.rfind("\n\n") + 2]  # a partial event at the cut is dropped, as EventSource does
        return [e for e in parse(complete) if "event" in e]


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def slow_disconnects(session: aiohttp.ClientSession, base: str) -> float:
    return await metric(session, base, "tokenrelay_gateway_slow_subscriber_disconnects_total")


def counter(seen: list[int], i: int) -> Callable[[dict[str, str]], None]:
    """An ``on_event`` that counts subscriber ``i``'s events in ``seen``."""

    def count(_: dict[str, str]) -> None:
        seen[i] += 1

    return count


async def every_one_has(seen: list[int], events: int) -> None:
    """Until every subscriber counted in ``seen`` has received ``events`` events."""
    await wait_until(lambda: all(n >= events for n in seen), lambda: f"events per subscriber {seen}, not {events}")


async def test_slow_subscribers_are_cut_with_a_resumable_cursor_and_memory_stays_bounded(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = gateway_settings(
        kafka_bootstrap, topic_prefix, hub_memory_events=64, subscriber_buffer=SUBSCRIBER_BUFFER
    )
    await ensure_topics(settings)
    rid = new_request_id()
    run = "run-slow"
    n_tokens = ROUNDS * EVENTS_PER_ROUND
    began = time.monotonic()
    with running_gateway(settings) as gw:
        assert gw.proc is not None
        pid = gw.proc.pid
        path = f"/v1/requests/{rid}/events"
        async with (
            EventWriter(settings) as writer,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            now = int(time.time() * 1000)
            await writer.publish(TokenEvent(rid, run, 0, now, Started("scripted", "scripted-model", 4, 0)))
            baseline = rss(pid)
            slow = await asyncio.gather(*(SlowClient.connect(settings.gateway_port, path) for _ in range(N_SLOW)))
            fast_seen = [0] * N_FAST  # events each fast subscriber has received
            fast = [
                asyncio.create_task(follow_sse(session, gw.url + path, deadline_s=180, on_event=counter(fast_seen, i)))
                for i in range(N_FAST)
            ]
            after_connect = rss(pid)
            samples = []
            seq = 1
            for _ in range(ROUNDS):
                batch = []
                for _ in range(EVENTS_PER_ROUND):
                    text = f" {seq:06d}" + "x" * (TEXT_BYTES - 7)
                    batch.append(TokenEvent(rid, run, seq, now, Delta(text, (seq,))))
                    seq += 1
                for i in range(0, len(batch), CHUNK):
                    await writer.publish(*batch[i : i + CHUNK])
                    # A worker's pace: the next chunk once the fast subscribers have this one.
                    await every_one_has(fast_seen, batch[min(i + CHUNK, len(batch)) - 1].seq + 1)
                samples.append(rss(pid))
            await writer.publish(TokenEvent(rid, run, seq, now, Finished("length", Usage(4, n_tokens))))
            fast_results = await asyncio.gather(*fast)
            disconnects = await slow_disconnects(session, gw.url)
            peak = max(samples)
            # Every slow client now reads what it was sent, then resumes from its last complete event.
            slow_parts = [await client.read_rest() for client in slow]
            await wait_subscribers(session, gw.url, 0, at_most=True)
            after_slow_left = rss(pid)
            resumed = await asyncio.gather(
                *(follow_sse(session, gw.url + path, cursor=part[-1]["id"]) for part in slow_parts)
            )
            log_stream = (await read_log_streams(settings, [rid]))[rid]
            healthy = (await session.get(f"{gw.url}/healthz")).status
    fast_tally, slow_tally = Tally(), Tally()
    for result in fast_results:
        fast_tally.add(tally(result.events, log_stream))
    for part, rest in zip(slow_parts, resumed, strict=True):
        slow_tally.add(tally(part + rest.events, log_stream))
    cut_at = sorted(len(part) for part in slow_parts)
    stream_bytes = n_tokens * TEXT_BYTES
    print(
        f"\n{N_SLOW} slow + {N_FAST} fast subscribers of one {stream_bytes / MB:.1f} MB stream "
        f"({n_tokens} tokens of {TEXT_BYTES} B), subscriber buffer {SUBSCRIBER_BUFFER}; "
        f"{time.monotonic() - began:.1f}s\n"
        f"  slow disconnects (metric): {disconnects:.0f}; slow clients cut after {cut_at[0]}..{cut_at[-1]} events "
        f"of {len(log_stream)}\n"
        f"  gateway RSS: baseline {baseline / MB:.1f} MB, after connecting {after_connect / MB:.1f} MB, "
        f"after each round {[round(s / MB, 1) for s in samples]} MB (growth {(peak - baseline) / MB:.1f} MB; "
        f"unbounded buffering would hold {N_SLOW * stream_bytes / MB:.0f} MB; "
        f"{(peak - baseline) / N_SLOW / 1024:.0f} KB per slow client), {after_slow_left / MB:.1f} MB after they left\n"
        f"  fast subscribers: {fast_tally}, reconnects {sum(r.connections - 1 for r in fast_results)}\n"
        f"  slow subscribers after resume: {slow_tally}"
    )
    assert healthy == 200
    assert disconnects >= N_SLOW
    assert all(len(part) < len(log_stream) for part in slow_parts), "a slow client was not cut"
    assert fast_tally.clean and fast_tally.streams == N_FAST, fast_tally
    assert all(r.connections == 1 for r in fast_results), "fast subscribers must not be disconnected"
    assert slow_tally.clean and slow_tally.streams == N_SLOW, slow_tally
    # Generous bounds: a slow client holds at most its queue (shared events) and one socket write of it, never
    # the stream; once they are cut, more of the stream adds nothing per slow client.
    per_client_bound = 2 * SUBSCRIBER_BUFFER * TEXT_BYTES + 256 * 1024
    assert peak - baseline < N_SLOW * per_client_bound + 32 * MB
    assert samples[-1] - samples[1] < 20 * MB, "memory kept growing with the stream after the slow clients were cut"


def _gateway_has_peer(pid: int, client_port: int) -> bool:
    return any(
        c.raddr and c.raddr.port == client_port and c.status == psutil.CONN_ESTABLISHED
        for c in psutil.Process(pid).net_connections(kind="tcp")
    )


async def test_a_slow_subscriber_blocked_in_a_write_is_aborted_and_resumes(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A peer that stops reading blocks its handler in a write; dropping it as slow must close the connection then."""
    settings = gateway_settings(kafka_bootstrap, topic_prefix, subscriber_buffer=16, sse_send_buffer=65536)
    await ensure_topics(settings)
    rid = new_request_id()
    run = "run-stalled"
    n_tokens = 300
    with running_gateway(settings) as gw:
        assert gw.proc is not None
        pid = gw.proc.pid
        path = f"/v1/requests/{rid}/events"
        async with (
            EventWriter(settings) as writer,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            now = int(time.time() * 1000)
            await writer.publish(TokenEvent(rid, run, 0, now, Started("scripted", "scripted-model", 4, 0)))
            stalled = await SlowClient.connect(settings.gateway_port, path)
            client_port = stalled.writer.get_extra_info("sockname")[1]
            assert _gateway_has_peer(pid, client_port)
            seen = [0]  # events a subscriber that keeps up has received
            reader = asyncio.create_task(follow_sse(session, gw.url + path, on_event=counter(seen, 0)))
            events = [
                TokenEvent(rid, run, seq, now, Delta(f" {seq:06d}" + "x" * (TEXT_BYTES - 7), (seq,)))
                for seq in range(1, n_tokens + 1)
            ]
            for i in range(0, len(events), CHUNK):
                await writer.publish(*events[i : i + CHUNK])
                await every_one_has(seen, events[min(i + CHUNK, len(events)) - 1].seq + 1)
            await writer.publish(TokenEvent(rid, run, n_tokens + 1, now, Finished("length", Usage(4, n_tokens))))
            await reader
            # The client still reads nothing: the gateway must drop it and let go of the connection by itself.
            await wait_until(
                lambda: not _gateway_has_peer(pid, client_port),
                "the gateway let go of a dropped subscriber's connection",
                timeout_s=20,
                interval_s=0.2,
            )
            disconnects = await slow_disconnects(session, gw.url)
            part = await stalled.read_rest()
            rest = await follow_sse(session, gw.url + path, cursor=part[-1]["id"])
            log_stream = (await read_log_streams(settings, [rid]))[rid]
    assert disconnects >= 1
    assert len(part) < len(log_stream)
    result = tally(part + rest.events, log_stream)
    assert result.clean, result

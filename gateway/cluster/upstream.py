"""Following a request whose events partition another gateway reads: one SSE stream from the owner per request.

The stream is the public one (``GET /v1/requests/{id}/events``) resumed with ``Last-Event-ID`` after the last event
this gateway has, so cursors pass through unchanged and a move to a new owner after a rebalance is a resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.cluster.owners import Owners
from gateway.cluster.peers import NONCE_HEADER, PEER_HEADER, PROOF_HEADER, Peers
from gateway.fanout.cursor import Cursor, decode_framed, encode_cursor
from gateway.fanout.following import Sink
from gateway.fanout.history import Entry
from gateway.fanout.subscription import Out
from gateway.metrics import GatewayMetrics
from schemas.errors import CursorError
from schemas.view import EventName, ViewEvent
from services import tracing

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Tokenrelay-Forwarded"
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0


_NAMES = {name.value.encode(): name for name in EventName}


def parse_block(block: bytes, now_ms: int) -> Out | None:
    """One SSE event of the owner's stream (``id``, ``event``, one ``data`` line) as the relay's Out; None otherwise."""
    lines = block.split(b"\n")
    if len(lines) != 3:
        return None  # a comment, the retry line, or an event without a cursor (reset)
    cursor_line, name_line, data_line = lines  # the owner frames exactly these three (gateway.fanout.sse.frame)
    if not (cursor_line.startswith(b"id: ") and name_line.startswith(b"event: ") and data_line.startswith(b"data: ")):
        return None
    name = _NAMES.get(name_line[7:])
    if name is None:
        return None
    cursor = decode_framed(cursor_line[4:])
    body = json.loads(data_line[6:])
    ev = ViewEvent(cursor.offset, name, body, body.get("run_id", ""), body.get("seq", -1), now_ms)
    return Out(ev, cursor.epoch, block + b"\n\n")


def reset_reason(block: bytes) -> str | None:
    if b"event: reset" not in block:
        return None
    for line in block.split(b"\n"):
        if line.startswith(b"data: "):
            with contextlib.suppress(ValueError, AttributeError):
                return str(json.loads(line[6:]).get("reason", "reset"))
    return "reset"


class UpstreamEnded(Exception):
    """The owner's stream ended or failed before the request's terminal event."""


class UpstreamRefused(UpstreamEnded):
    """The owner answered with a client error (other than "not the owner" or "too many requests")."""


class UpstreamUntrusted(UpstreamEnded):
    """The gateway the group names as the owner did not prove it holds the gateways' shared secret."""


# What a client of a followed request is told when its stream cannot be relayed: (code, message).
_FAILURES: dict[type[BaseException], tuple[str, str]] = {
    UpstreamUntrusted: (
        "upstream_untrusted",
        "the gateway that reads this request's partition did not prove it is one of this cluster's gateways",
    ),
    UpstreamRefused: ("upstream_refused", "the gateway that reads this request's partition refused to stream it"),
}


@dataclass
class _Follow:
    entry: Entry
    sink: Sink
    task: asyncio.Task[None] | None = None
    attached: asyncio.Event = field(default_factory=asyncio.Event)


class Follower:
    """Keeps one upstream stream per followed request, to whichever gateway the group says reads its partition."""

    def __init__(
        self,
        owners: Owners,
        *,
        peers: Peers,
        keepalive_s: float = 15.0,
        batch: int = 512,
        metrics: GatewayMetrics | None = None,
    ):
        self.owners = owners
        self.metrics = metrics or GatewayMetrics()
        self.peers = peers
        self.read_timeout_s = 2 * keepalive_s + 5
        self.batch = batch
        self._follows: dict[str, _Follow] = {}
        self._session: aiohttp.ClientSession | None = None

    def follow(self, entry: Entry, sink: Sink) -> None:
        state = self._follows.get(entry.request_id)
        if state is not None and state.entry is entry and state.task is not None and not state.task.done():
            return
        if entry.terminal is not None:
            return
        if state is not None and state.task is not None:
            state.task.cancel()  # an entry forgotten and made again: only the new one is fed
        state = _Follow(entry, sink)
        self._follows[entry.request_id] = state
        self.metrics.followed.set(len(self._follows))
        state.task = asyncio.create_task(self._run(state), name=f"upstream {entry.request_id}")

    def stop(self, entry: Entry) -> None:
        state = self._follows.get(entry.request_id)
        if state is not None and state.entry is entry:
            del self._follows[entry.request_id]
            self.metrics.followed.set(len(self._follows))
            if state.task is not None:
                state.task.cancel()

    async def attached(self, entry: Entry, timeout_s: float) -> None:
        state = self._follows.get(entry.request_id)
        if state is not None and state.entry is entry:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.attached.wait(), timeout_s)

    async def close(self) -> None:
        tasks = [s.task for s in self._follows.values() if s.task is not None]
        self._follows.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _session_of(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def _run(self, state: _Follow) -> None:
        entry = state.entry
        delay = RETRY_MIN_S
        try:
            while entry.terminal is None:
                generation = self.owners.generation
                url = self.owners.url_of(entry.partition)
                if url is None or url == self.owners.me:
                    await self.owners.changed(generation)  # no owner yet, or this gateway: the relay takes it over
                    continue
                reader = asyncio.create_task(self._read(url, state))
                try:
                    moved = await self._until_moved(reader, entry.partition, url)
                finally:
                    if not reader.done():
                        reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
                if moved:
                    delay = RETRY_MIN_S
                    continue  # go to the partition's new owner, after the last event this gateway has
                exc = reader.exception()
                if exc is None:
                    return  # the terminal event came (or the owner says there is nothing after the last one)
                failure = _FAILURES.get(type(exc))
                if failure is not None:
                    # Never relayed, and not waited on forever: the client's stream ends with the error.
                    log.warning("request %s: not followed from %s: %s", entry.request_id, url, exc)
                    state.sink.fail(entry, *failure)
                    state.attached.set()  # answered, if only with a refusal: a subscriber waiting for it goes on
                    return
                log.debug("request %s: upstream %s: %s; retrying", entry.request_id, url, exc)
                # Until the group moves the partition (a dead owner), or briefly (an owner that just restarted).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.owners.changed(generation), delay)
                delay = min(RETRY_MAX_S, delay * 2)
        finally:
            if self._follows.get(entry.request_id) is state:
                del self._follows[entry.request_id]
                self.metrics.followed.set(len(self._follows))

    async def _until_moved(self, reader: asyncio.Task[None], partition: int, url: str) -> bool:
        """Waits for the reader to end; True instead when the partition's owner changes first."""
        while True:
            moved = asyncio.create_task(self.owners.changed(self.owners.generation))
            try:
                await asyncio.wait({reader, moved}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
            if reader.done():
                return False
            if self.owners.url_of(partition) != url:
                return True

    async def _read(self, base: str, state: _Follow) -> None:
        entry = state.entry
        nonce = self.peers.nonce()
        headers = {
            FORWARDED_HEADER: "1",
            NONCE_HEADER: nonce,
            PEER_HEADER: self.peers.credential(entry.request_id),
        }
        if entry.last_out is not None:
            last = entry.last_out
            headers["Last-Event-ID"] = encode_cursor(Cursor(last.epoch, entry.partition, last.offset))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.read_timeout_s)
        url = f"{base}/v1/requests/{entry.request_id}/events"
        self.metrics.upstream_connects.inc()
        async with self._session_of().get(url, headers=headers, timeout=timeout) as response:
            if response.status not in (200, 204):
                body = (await response.read())[:200]
                # 421: not the owner (yet); 429: its backfills are busy. Both pass.
                refused = 400 <= response.status < 500 and response.status not in (421, 429)
                raise (UpstreamRefused if refused else UpstreamEnded)(f"status {response.status}: {body!r}")
            if not self.peers.is_owner(nonce, entry.request_id, base, response.headers.get(PROOF_HEADER)):
                raise UpstreamUntrusted(f"{base} answered without a valid proof")
            if response.status == 204:
                return  # its last event here is the terminal one: nothing follows
            if tracing.enabled() and (trace := tracing.http_trace(response.headers)):
                entry.trace = trace  # the owner read it from the request's records
            state.attached.set()
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *blocks, buffer = buffer.split(b"\n\n")
                now_ms = int(time.time() * 1000)
                for i, block in enumerate(blocks, 1):
                    try:
                        out = parse_block(block, now_ms)
                    except (CursorError, ValueError, KeyError) as exc:
                        raise UpstreamEnded(f"unreadable event from {base}: {exc}") from exc
                    if out is None:
                        if (reason := reset_reason(block)) is not None:
                            state.sink.reset(entry, reason)
                            return
                        continue
                    state.sink.feed(entry, out)
                    if out.event.terminal:
                        return
                    if i % self.batch == 0:
                        await asyncio.sleep(0)  # let subscribers drain a long backlog as it is handed on
        raise UpstreamEnded(f"{base} ended the stream")

"""Two relays over one log: unwatched keys go undecoded, a relay follows what the other reads through the
subscribe/resume contract, and watched streams change owner mid-way with nothing lost or repeated."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.fanout.cursor import Cursor, decode_cursor
from gateway.fanout.following import Sink
from gateway.fanout.history import Entry
from gateway.fanout.relay import Relay
from gateway.fanout.sse import parse
from schemas.codec import Codec, default_codec
from schemas.errors import NotOwner
from schemas.ids import new_request_id
from schemas.records import TokenEvent
from tests.unit.hub_support import MemorySource, drain, settle, stream
from tests.waiting import wait_until


class CountingCodec(Codec):
    def __init__(self) -> None:
        super().__init__(default_codec().registry)
        self.decoded = 0

    def decode_event(self, data: bytes) -> TokenEvent:
        self.decoded += 1
        return super().decode_event(data)


class RelayUpstream:
    """Follows entries from another relay in-process, exactly as gateway.cluster.upstream does over HTTP: a forwarded
    subscription resumed after the entry's last event, retried while the other relay does not own the partition."""

    def __init__(self) -> None:
        self.owner: Relay | None = None  # the other relay, once it exists
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.ready: dict[str, asyncio.Event] = {}

    def follow(self, entry: Entry, sink: Sink) -> None:
        task = self.tasks.get(entry.request_id)
        if task is None or task.done():
            self.ready[entry.request_id] = asyncio.Event()
            self.tasks[entry.request_id] = asyncio.create_task(self._run(entry, sink))

    def stop(self, entry: Entry) -> None:
        task = self.tasks.pop(entry.request_id, None)
        if task is not None:
            task.cancel()

    async def attached(self, entry: Entry, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready[entry.request_id].wait(), timeout_s)

    async def _run(self, entry: Entry, sink: Sink) -> None:
        assert self.owner is not None
        while entry.terminal is None:
            last = entry.last_out
            after = Cursor(last.epoch, entry.partition, last.offset) if last is not None else None
            try:
                sub = await self.owner.subscribe(entry.request_id, after, forwarded=True)
            except NotOwner:
                await asyncio.sleep(0.01)
                continue
            if sub is None:
                return
            self.ready[entry.request_id].set()
            try:
                for old in sub.backlog:
                    sink.feed(entry, old)
                while entry.terminal is None:
                    live = await sub.next(0.2)
                    if live is not None:
                        sink.feed(entry, live)
                    elif sub.closed is not None:
                        break  # moved: resume from whoever owns it now
            finally:
                self.owner.unsubscribe(sub)


async def polled(source: MemorySource) -> None:
    """Until the source has handed out every record of its log (the relay dispatches what it owns)."""
    await wait_until(
        lambda: all(source.read.get(p) == len(records) for p, records in source.log.items()),
        lambda: f"source handed out {source.read} of {[len(r) for r in source.log.values()]} records",
        timeout_s=5,
        interval_s=0.01,
    )


async def two_relays(partitions: int = 1) -> tuple[MemorySource, MemorySource, Relay, Relay]:
    """Relay a reads every partition; relay b reads the same log and owns none of it."""
    source_a, source_b = MemorySource(partitions), MemorySource(partitions)
    source_b.log = source_a.log
    up_a, up_b = RelayUpstream(), RelayUpstream()
    a, b = Relay(source_a, memory_events=4, upstream=up_a), Relay(source_b, memory_events=4, upstream=up_b)
    up_a.owner, up_b.owner = b, a
    await a.start()
    await b.start()
    b.reassign({}, set(range(partitions)), 0)
    return source_a, source_b, a, b


async def test_records_of_keys_nobody_watches_are_not_decoded() -> None:
    source = MemorySource()
    codec = CountingCodec()
    relay = Relay(source, codec=codec)
    await relay.start()
    ids = [new_request_id() for _ in range(20)]
    for rid in ids:
        for e in stream(rid, 10):
            source.append(e)
    await settle(source, relay)
    assert codec.decoded == 0 and not relay.history.entries
    # Asked for later, such a request comes whole from the source, and is followed live from then on.
    events = parse((await drain(relay, await relay.subscribe(ids[3], None))).decode())  # type: ignore[arg-type]
    assert [e["event"] for e in events] == ["started"] + ["token"] * 10 + ["done"]
    assert source.replays == 1 and codec.decoded == 12
    await relay.stop()


async def test_a_hub_follows_what_another_reads_with_the_same_cursors() -> None:
    source, _, a, b = await two_relays()
    rid = new_request_id()
    on_b = await b.subscribe(rid, None)
    on_a = await a.subscribe(rid, None)
    assert on_a is not None and on_b is not None
    for e in stream(rid, 9):
        source.append(e)
    via_a, via_b = await drain(a, on_a), await drain(b, on_b)
    assert via_b == via_a  # byte for byte: the owner's framing and cursors
    events = parse(via_a.decode())
    for k, sse in enumerate(events):  # resume on the follower from any cursor the owner handed out
        rest = await b.subscribe(rid, decode_cursor(sse["id"]))
        if sse["event"] == "done":
            assert rest is None
            continue
        assert rest is not None
        assert events[: k + 1] + parse((await drain(b, rest)).decode()) == events
    await a.stop()
    await b.stop()


async def test_watched_streams_change_owner_midway_without_loss_or_repeat() -> None:
    source_a, source_b, a, b = await two_relays()
    rid = new_request_id()
    evs = stream(rid, 30)
    subs = [await relay.subscribe(rid, None) for relay in (a, b, a, b)]
    assert all(s is not None for s in subs)
    seen: list[list[bytes]] = [[] for _ in subs]
    readers = [
        asyncio.create_task(drain(relay, s, into))  # type: ignore[arg-type]
        for relay, s, into in zip((a, b, a, b), subs, seen, strict=True)
    ]

    async def every_reader_has(n: int) -> None:
        await wait_until(lambda: all(len(s) >= n for s in seen), lambda: f"readers saw {[len(s) for s in seen]} of {n}")

    for e in evs[:10]:
        source_a.append(e)
    await every_reader_has(10)
    # The group moves the partition from a to b (a revokes first, as in a rebalance), then back again.
    for old, new, new_source in ((a, b, source_b), (b, a, source_a)):
        old.reassign({}, {0}, 0)
        await polled(new_source)
        new.reassign({0: new_source.read[0]}, set(), 0)
        for e in evs[10:20] if new is b else evs[20:]:
            new_source.append(e)
        await every_reader_has(20 if new is b else len(evs))
    outs = [parse(x.decode()) for x in await asyncio.wait_for(asyncio.gather(*readers), 10)]
    whole = parse((await drain(a, await a.subscribe(rid, None))).decode())  # type: ignore[arg-type]
    assert [e["event"] for e in whole] == ["started"] + ["token"] * 30 + ["done"]
    assert all(o == whole for o in outs)
    await a.stop()
    await b.stop()


def test_an_owners_sse_event_parses_back_into_the_same_out() -> None:
    from gateway.cluster.upstream import parse_block, reset_reason
    from gateway.fanout.subscription import make_out
    from schemas.view import replay

    rid = new_request_id()
    for offset, view_event in enumerate(replay(rid, list(enumerate(stream(rid, 3))))):
        out = make_out(5, rid, view_event)
        back = parse_block(out.framed.removesuffix(b"\n\n"), 0)
        assert back is not None and back.framed == out.framed and back.epoch == out.epoch
        assert (back.offset, back.event.event, back.event.data) == (
            view_event.offset,
            view_event.event,
            view_event.data,
        )
        assert back.event.terminal == view_event.terminal
        assert offset >= 0
    assert parse_block(b": keepalive", 0) is None and parse_block(b"retry: 1000", 0) is None
    assert reset_reason(b'event: reset\ndata: {"reason": "retention"}') == "retention"


def test_a_framed_cursor_parses_like_a_client_cursor() -> None:
    import random

    import pytest

    from gateway.fanout.cursor import decode_framed, encode_cursor
    from schemas.errors import CursorError

    rng = random.Random(3)
    for _ in range(500):
        cursor = Cursor(rng.randrange(1 << 16), rng.randrange(1 << 31), rng.randrange(1 << 63))
        text = encode_cursor(cursor)
        assert decode_framed(text.encode()) == decode_cursor(text) == cursor
    for garbage in (b"", b"!!", b"AAAA", b"AQ"):
        with pytest.raises(CursorError):
            decode_framed(garbage)

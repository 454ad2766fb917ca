"""The relay: fan-out, replay handover and slow subscribers, with an in-memory event source."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.cursor import Cursor, decode_cursor, event_epoch
from gateway.fanout.relay import Relay
from gateway.fanout.source import SourceRecord
from gateway.fanout.sse import parse
from schemas.errors import CursorError, TooManyBackfills
from schemas.ids import new_request_id
from tests.unit.hub_support import MemorySource, attached, drain, settle, slow_disconnects, stream


async def test_fan_out_identical_and_resume_everywhere() -> None:
    source = MemorySource()
    relay = Relay(source, memory_events=8)
    await relay.start()
    rid = new_request_id()
    subs = [await relay.subscribe(rid, None) for _ in range(20)]
    for e in stream(rid, 12):
        source.append(e)
    outs = [await drain(relay, s) for s in subs if s is not None]
    assert len(set(outs)) == 1
    events = parse(outs[0].decode())
    assert [e["event"] for e in events][:2] == ["started", "token"] and events[-1]["event"] == "done"
    # Resume after every event (memory holds only 8, older positions replay from the source): pieces == whole.
    for k, sse in enumerate(events):
        sub = await relay.subscribe(rid, decode_cursor(sse["id"]))
        if sse["event"] == "done":
            assert sub is None
            continue
        assert sub is not None
        rest = parse((await drain(relay, sub)).decode())
        assert events[: k + 1] + rest == events
    await relay.stop()


async def test_late_subscriber_backfills_once_and_hands_over() -> None:
    source = MemorySource()
    rid = new_request_id(now_ms=1)  # older than the relay's start: the relay cannot vouch for its beginning
    evs = stream(rid, 6)
    for e in evs[:3]:
        source.append(e)
    relay = Relay(source)
    source.read = {}
    await relay.start()
    for e in evs[3:5]:
        source.append(e)
    await settle(source, relay)
    sub_a, sub_b = await asyncio.gather(relay.subscribe(rid, None), relay.subscribe(rid, None))
    assert source.replays == 1
    for e in evs[5:]:
        source.append(e)
    a = await drain(relay, sub_a)  # type: ignore[arg-type]
    b = await drain(relay, sub_b)  # type: ignore[arg-type]
    assert a == b
    assert [x["data"] for x in parse(a.decode()) if x["event"] == "token"] == [
        f'{{"seq":{i},"text":"t{i}","token_ids":[{i}]}}' for i in range(1, 7)
    ]
    await relay.stop()


async def test_slow_subscriber_is_dropped_without_blocking_others() -> None:
    source = MemorySource()
    relay = Relay(source, subscriber_buffer=4)
    await relay.start()
    rid = new_request_id()
    slow = await relay.subscribe(rid, None)
    fast = await relay.subscribe(rid, None)
    assert slow is not None and fast is not None
    assert relay.subscriber_count(rid) == 2 and attached(relay) == 2
    reader = asyncio.create_task(drain(relay, fast))
    for e in stream(rid, 30):
        source.append(e)
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
    whole = await reader
    assert slow.closed == "slow" and slow_disconnects(relay) == 1
    assert relay.subscriber_count(rid) == 0 and attached(relay) == 0  # one dropped, one unsubscribed at its end
    assert parse(whole.decode())[-1]["event"] == "done"
    await relay.stop()


async def test_unknown_cursor_gets_reset() -> None:
    source = MemorySource(partitions=1)
    relay = Relay(source)
    await relay.start()
    rid = new_request_id()
    for e in stream(rid, 2):
        source.append(e)
    await settle(source, relay)
    first = parse((await drain(relay, await relay.subscribe(rid, None))).decode())  # type: ignore[arg-type]
    cursor = decode_cursor(first[1]["id"])
    forged = type(cursor)((cursor.epoch + 1) % 65536, cursor.partition, cursor.offset)
    sub = await relay.subscribe(rid, forged)
    assert sub is not None
    again = parse((await drain(relay, sub)).decode())
    assert again[0] == {"event": "reset", "data": '{"reason": "unknown_cursor"}'} and again[1:] == first
    await relay.stop()


async def test_memory_budget_forgets_least_recently_used_finished_requests_and_replays_them() -> None:
    source = MemorySource()
    relay = Relay(source, memory_events=8, memory_total_events=40, max_requests=100)
    await relay.start()
    watched = new_request_id()
    sub = await relay.subscribe(watched, None)
    assert sub is not None
    for e in stream(watched, 3)[:-1]:  # unfinished, with a subscriber: never forgotten
        source.append(e)
    finished = [new_request_id() for _ in range(12)]
    for i, rid in enumerate(finished):
        watcher = await relay.subscribe(rid, None)  # watched while it runs: kept in memory after, for fast resume
        for e in stream(rid, 10):
            source.append(e)
        await settle(source, relay)
        await drain(relay, watcher)  # type: ignore[arg-type]
        if i == 3:  # 3 + 4 x 8 events: all still in memory
            assert all(r in relay.history.entries for r in finished[:4])
            await relay.snapshot(finished[0])  # used recently: outlives the other early ones
        if i == 4:
            assert finished[0] in relay.history.entries and finished[1] not in relay.history.entries
        assert relay.history.memory_count <= 40
        assert relay.history.memory_count == sum(len(e.outs) for e in relay.history.entries.values())
    assert watched in relay.history.entries and sub.closed is None and finished[-1] in relay.history.entries
    # Forgotten or not, every request replays exactly, from its start and from every cursor.
    for rid in finished:
        whole = await drain(relay, await relay.subscribe(rid, None))  # type: ignore[arg-type]
        events = parse(whole.decode())
        assert [e["event"] for e in events] == ["started"] + ["token"] * 10 + ["done"]
    events = parse((await drain(relay, await relay.subscribe(finished[2], None))).decode())  # type: ignore[arg-type]
    for k, sse in enumerate(events[:-1]):
        rest = await relay.subscribe(finished[2], decode_cursor(sse["id"]))
        assert rest is not None
        assert events[: k + 1] + parse((await drain(relay, rest)).decode()) == events
    source.append(stream(watched, 3)[-1])
    assert parse((await drain(relay, sub)).decode())[-1]["event"] == "done"
    await relay.stop()


async def test_request_limit_forgets_finished_requests_which_then_replay_from_the_source() -> None:
    source = MemorySource(partitions=1)  # dispatched in submission order: ids[0] is the least recently used
    relay = Relay(source, max_requests=4)
    await relay.start()
    ids = [new_request_id() for _ in range(10)]
    for rid in ids:
        for e in stream(rid, 3):
            source.append(e)
    await settle(source, relay)
    assert len(relay.history.entries) <= 4
    replays = source.replays
    sub = await relay.subscribe(ids[0], None)  # forgotten: must come back whole, not as an empty stream
    assert sub is not None
    events = parse((await drain(relay, sub)).decode())
    assert [e["event"] for e in events] == ["started", "token", "token", "token", "done"]
    assert source.replays == replays + 1
    await relay.stop()


async def test_a_burst_larger_than_the_buffer_in_one_poll_keeps_fast_readers() -> None:
    source = MemorySource()
    relay = Relay(source, subscriber_buffer=64)
    await relay.start()
    rid = new_request_id()
    fast = await relay.subscribe(rid, None)
    slow = await relay.subscribe(rid, None)
    assert fast is not None and slow is not None
    reader = asyncio.create_task(drain(relay, fast))
    await asyncio.sleep(0)
    for e in stream(rid, 2000):  # one poll hands out all 2,002 records
        source.append(e)
    whole = await asyncio.wait_for(reader, 10)
    assert fast.closed is None and len(parse(whole.decode())) == 2002
    assert slow.closed == "slow" and slow_disconnects(relay) == 1
    await relay.stop()


async def test_a_subscriber_dropped_as_slow_has_its_connection_aborted() -> None:
    source = MemorySource()
    relay = Relay(source, subscriber_buffer=4)
    await relay.start()
    rid = new_request_id()
    slow = await relay.subscribe(rid, None)
    gone = await relay.subscribe(rid, None)
    assert slow is not None and gone is not None
    aborted: list[str] = []
    slow.on_slow = lambda: aborted.append("slow")
    gone.on_slow = lambda: aborted.append("gone")
    relay.unsubscribe(gone)  # a handler that left no longer gets callbacks
    for e in stream(rid, 20):
        source.append(e)
    await settle(source, relay)
    assert slow.closed == "slow" and aborted == ["slow"]
    await relay.stop()


async def test_cursors_beyond_the_end_of_a_stream_are_refused_not_204_or_waiting() -> None:
    source = MemorySource(partitions=1)
    relay = Relay(source)
    await relay.start()
    done, live = new_request_id(), new_request_id()
    for e in stream(done, 3):
        source.append(e)
    source.append(stream(live, 3)[0])  # only started
    await settle(source, relay)
    whole = parse((await drain(relay, await relay.subscribe(done, None))).decode())  # type: ignore[arg-type]
    terminal = decode_cursor(whole[-1]["id"])
    assert await relay.subscribe(done, terminal) is None  # the real terminal cursor: 204
    # Past the terminal event, with its check or any other: nothing of this request is there.
    for offset, epoch in [(terminal.offset + 1, terminal.epoch), (terminal.offset + 1, 7), (10**6, terminal.epoch)]:
        with pytest.raises(CursorError):
            await relay.subscribe(done, replace(terminal, offset=offset, epoch=epoch))
    # At the terminal's offset with a wrong check: a reset and the whole stream, not a silent end.
    sub = await relay.subscribe(done, replace(terminal, epoch=(terminal.epoch + 1) % 65536))
    assert sub is not None
    assert parse((await drain(relay, sub)).decode())[1:] == whole
    # An unfinished request and an offset the log has not reached: refused at once, not keepalives forever.
    with pytest.raises(CursorError):
        await asyncio.wait_for(relay.subscribe(live, replace(terminal, offset=10**6)), 5)
    await relay.stop()


class LaggingSource(MemorySource):
    """A source whose reader is held back: the log has records the relay has not read yet (a gateway behind another)."""

    def __init__(self) -> None:
        super().__init__(partitions=1)
        self.gate = asyncio.Event()
        self.parked = asyncio.Event()

    async def poll(self) -> list[SourceRecord]:
        if not self.gate.is_set():
            self.parked.set()
            await self.gate.wait()
        return await super().poll()


async def test_a_cursor_ahead_of_this_gateway_waits_until_it_is_read_then_resumes() -> None:
    source = LaggingSource()
    source.gate.set()
    relay = Relay(source)
    await relay.start()
    rid = new_request_id()
    events = stream(rid, 4)
    source.append(events[0])
    await settle(source, relay)
    source.gate.clear()
    await source.parked.wait()
    for e in events[1:]:
        source.append(e)
    # Another gateway handed out a cursor for the second token (offset 2); this one has read only offset 0.
    ahead = Cursor(event_epoch(rid, "r1", 2), 0, 2)
    pending = asyncio.create_task(relay.subscribe(rid, ahead))
    finished, _ = await asyncio.wait({pending}, timeout=0.2)
    assert not finished  # it cannot answer before the relay has read offset 2
    source.gate.set()
    sub = await asyncio.wait_for(pending, 5)
    assert sub is not None and not sub.preamble
    rest = parse((await drain(relay, sub)).decode())
    assert [e["event"] for e in rest] == ["token", "token", "done"]
    await relay.stop()


class GatedReplaySource(MemorySource):
    """Replays (backfills) wait at a gate, so that several are in flight at once; counts the most at a time."""

    def __init__(self) -> None:
        super().__init__(partitions=1)
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.most = 0
        self.entered = asyncio.Event()

    async def replay(self, partition: int, from_time_ms: int, stop_offset: int, key: bytes) -> list[SourceRecord]:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.entered.set()
        try:
            await self.gate.wait()
            return await super().replay(partition, from_time_ms, stop_offset, key)
        finally:
            self.in_flight -= 1


class Recorder:
    """Collects a BackfillLimit's events; lets a test wait until one has happened n times."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.changed = asyncio.Event()

    def __call__(self, event: str) -> None:
        self.events.append(event)
        self.changed.set()

    async def until(self, event: str, n: int) -> None:
        while self.events.count(event) < n:
            self.changed.clear()
            await self.changed.wait()


async def test_backfills_wait_their_turn_per_client_and_overall() -> None:
    source = GatedReplaySource()
    seen = Recorder()
    relay = Relay(source, backfills=BackfillLimit(per_client=1, total=2, queue_per_client=2, on_event=seen))
    await relay.start()
    old = [new_request_id(now_ms=1000 + i) for i in range(6)]  # older than the relay: unknown, so each is a scan
    first = asyncio.create_task(relay.snapshot(old[0], "client-a"))
    await seen.until("started", 1)
    # Client a has its one scan running: its next look-ups wait their turn (the same id joins the running scan).
    queued = [asyncio.create_task(relay.snapshot(rid, "client-a")) for rid in old[1:3]]
    again = asyncio.create_task(relay.snapshot(old[0], "client-a"))
    await seen.until("waited_for_client", 2)
    with pytest.raises(TooManyBackfills):  # and past its queue, it is refused before any read
        await relay.snapshot(old[3], "client-a")
    # Client b does not wait behind client a: it takes the second slot at once.
    other = asyncio.create_task(relay.snapshot(old[4], "client-b"))
    await seen.until("started", 2)
    assert source.in_flight == 2 and relay.history.backfills.waiting("client-a") == 3
    source.gate.set()
    views = await asyncio.gather(first, again, other, *queued)
    assert [v.status for v in views] == ["queued"] * 5
    assert source.most == 2 and source.replays == 4  # never two of client a's at once
    assert seen.events.count("refused") == 1 and seen.events.count("started") == 4
    assert relay.history.backfills.waiting("client-a") == 0 and relay.history.backfills.running == 0
    await relay.snapshot(old[5], "client-a")
    await relay.stop()

"""An in-memory event source and readers for the relay's unit tests (no Kafka)."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.fanout.relay import Relay
from gateway.fanout.source import SourceRecord
from gateway.fanout.subscription import Subscription
from schemas.codec import default_codec
from schemas.partitioning import partition_for_key
from schemas.records import Delta, Finished, Started, TokenEvent, Usage
from tests.waiting import wait_until


class MemorySource:
    """Partitions as Python lists; poll hands out what was appended since the last poll."""

    def __init__(self, partitions: int = 4):
        self.partitions = partitions
        self.log: dict[int, list[SourceRecord]] = {p: [] for p in range(partitions)}
        self.read: dict[int, int] = {}
        self.new = asyncio.Event()
        self.replays = 0

    def append(self, ev: TokenEvent) -> None:
        p = partition_for_key(ev.request_id, self.partitions)
        self.log[p].append(
            SourceRecord(p, len(self.log[p]), ev.request_id.encode(), default_codec().encode(ev), ev.ts_ms)
        )
        self.new.set()

    async def start(self) -> tuple[dict[int, int], int]:
        self.read = {p: len(r) for p, r in self.log.items()}
        return dict(self.read), 0

    async def poll(self) -> list[SourceRecord]:
        self.new.clear()
        out = []
        for p, records in self.log.items():
            out += records[self.read[p] :]
            self.read[p] = len(records)
        if not out:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.new.wait(), 0.05)
        return out

    async def replay(self, partition: int, from_time_ms: int, stop_offset: int, key: bytes) -> list[SourceRecord]:
        self.replays += 1
        await asyncio.sleep(0.01)
        return [r for r in self.log[partition][:stop_offset] if r.key == key]

    async def log_start(self, partition: int) -> int:
        return 0

    async def log_end(self, partition: int) -> int:
        return len(self.log[partition])

    async def stop(self) -> None:
        pass


def stream(rid: str, n: int, run: str = "r1") -> list[TokenEvent]:
    evs = [TokenEvent(rid, run, 0, 1, Started("w", "m", 2, 0))]
    evs += [TokenEvent(rid, run, i, 1, Delta(f"t{i}", (i,))) for i in range(1, n + 1)]
    evs.append(TokenEvent(rid, run, n + 1, 1, Finished("length", Usage(2, n))))
    return evs


async def drain(relay: Relay, sub: Subscription, seen: list[bytes] | None = None) -> bytes:
    """Everything a subscription sends until its terminal event; each event is also appended to ``seen`` as it
    arrives, for a test that waits on a reader's progress."""
    seen = [] if seen is None else seen
    seen += [o.framed for o in sub.backlog]
    if not any(o.event.terminal for o in sub.backlog):
        while True:
            item = await sub.next(2.0)
            assert item is not None, sub.closed
            seen.append(item.framed)
            if item.event.terminal:
                relay.unsubscribe(sub)
                break
    return b"".join(sub.preamble) + b"".join(seen)


def slow_disconnects(relay: Relay) -> float | None:
    return relay.metrics.registry.get_sample_value("tokenrelay_gateway_slow_subscriber_disconnects_total")


def attached(relay: Relay) -> float | None:
    return relay.metrics.registry.get_sample_value("tokenrelay_gateway_subscribers")


async def settle(source: MemorySource, relay: Relay) -> None:
    """Until the relay has read every record of the source's log."""
    await wait_until(
        lambda: all(relay.positions[p] == len(source.log[p]) for p in source.log),
        lambda: f"relay read {relay.positions} of {[len(r) for r in source.log.values()]} records",
        timeout_s=5,
        interval_s=0.01,
    )

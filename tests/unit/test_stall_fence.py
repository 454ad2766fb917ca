"""The stall fence: a worker frozen past part of its session sends no run's event until its group has settled."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from schemas.records import Delta, Started
from workers.publisher import Publisher, RunBroken, RunStream
from workers.stall import StallFence


def test_a_gap_longer_than_the_limit_fences_until_it_has_settled() -> None:
    fence = StallFence.for_session(6000, now=100.0)
    assert (fence.limit_s, fence.settle_s) == (3.0, 3.0)
    assert fence.tick(100.1) is None and not fence.fenced(100.1)
    assert fence.fenced(103.5)  # no tick for longer than the limit: a freeze under way, before the ticker sees it
    assert fence.tick(115.0) == pytest.approx(14.9)
    assert fence.tick(116.5) is None and fence.fenced(116.6)  # running again, but not settled yet
    assert fence.tick(118.1) is None and not fence.fenced(118.1)


def test_ticks_within_the_limit_never_fence() -> None:
    fence = StallFence(limit_s=1.0, settle_s=5.0, last_tick=0.0)
    for i in range(1, 100):
        assert fence.tick(i * 0.9) is None
        assert not fence.fenced(i * 0.9 + 0.05)


@dataclass
class Acks:
    """A producer that acknowledges every record at once, keeping what it was given."""

    sent: list[bytes] = field(default_factory=list)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, key: bytes, headers: Any) -> asyncio.Future[None]:
        self.sent.append(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_frozen_worker_breaks_its_runs_and_is_healthy_again_once_settled() -> None:
    producer = Acks()
    fence = StallFence(limit_s=0.3, settle_s=0.4, last_tick=time.monotonic() - 60)  # made a minute before start
    publisher = Publisher(lambda: producer, "events", fence=fence)
    await publisher.start()
    try:
        before = RunStream(publisher, "r1", "run-a")
        await before.emit(Started("w", "m", 1, 0))
        broken: list[str] = []
        during = RunStream(publisher, "r2", "run-b", on_broken=lambda s: broken.append(s.run_id))
        fence.last_tick -= 5.0  # as if the process had been stopped for 5 s: the event loop did not run
        with pytest.raises(RunBroken):
            await during.emit(Started("w", "m", 1, 0))
        assert broken == ["run-b"] and during.broken
        assert not publisher.healthy.is_set()
        with pytest.raises(RunBroken):  # nothing of the broken run is sent after its lost event
            await during.emit(Delta("x", (1,)))
        await asyncio.wait_for(publisher.healthy.wait(), 5)
        assert not fence.fenced(time.monotonic())
        after = RunStream(publisher, "r3", "run-c")
        await after.emit(Started("w", "m", 1, 0))
        assert producer.sent == [b"r1", b"r3"]
    finally:
        await publisher.stop()

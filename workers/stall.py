"""Self-fencing after a freeze: a worker stopped for longer than its group's patience publishes no run's event until the
group has had time to say whether its partitions moved to another worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StallFence:
    """A worker frozen (SIGSTOP, a paused VM, a swap storm) past part of its session may have been dropped from its
    group while its runs' partitions went to another worker, which continues them from the log. Events such a zombie
    sends on waking would land between the new owner's read of the log and its Started: its clients would see their
    text restart. So after a gap between ticks longer than ``limit_s``, runs' events are refused until ``settle_s``
    later (a heartbeat's answer, and the revocation it brings, arrive meanwhile); the runs are then taken up again
    from the log if their partitions are still this worker's.
    """

    limit_s: float
    settle_s: float
    last_tick: float
    fenced_until: float = 0.0

    @classmethod
    def for_session(cls, session_timeout_ms: int, now: float) -> StallFence:
        """A fence for a consumer-group session: a freeze of half the session may have cost the membership (the
        last heartbeat can be a third of a session old when it begins); settled after one heartbeat interval and a
        second more."""
        session_s = session_timeout_ms / 1000
        return cls(limit_s=session_s / 2, settle_s=session_s / 3 + 1.0, last_tick=now)

    def begin(self, now: float) -> None:
        """Start ticking at ``now`` (what came before, e.g. loading a model, was no freeze)."""
        self.last_tick, self.fenced_until = now, 0.0

    def tick(self, now: float) -> float | None:
        """Record that the event loop ran at ``now``; the length of the gap before it when that was a freeze."""
        gap = now - self.last_tick
        self.last_tick = max(self.last_tick, now)
        if gap <= self.limit_s:
            return None
        self.fenced_until = max(self.fenced_until, now + self.settle_s)
        return gap

    def fenced(self, now: float) -> bool:
        """Whether runs' events must not be sent now: a freeze is under way (no tick for too long, seen before the
        ticker saw it) or has not settled yet."""
        return now - self.last_tick > self.limit_s or now < self.fenced_until

"""Bounds on backfills (a Kafka scan for a request the hub does not hold): per client, and over all clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from schemas.errors import TooManyBackfills

# Backfills one client may have waiting for its turn; past that it is refused (429) instead of queued.
QUEUE_PER_CLIENT = 256


@dataclass
class _Client:
    turns: asyncio.Semaphore
    holders: int = 0  # waiting or scanning


class BackfillLimit:
    """At most ``per_client`` scans of one client at a time and ``total`` over all clients; the others wait in turn.

    A scan for an id the log does not hold reads the partition from the id's time to its end. Without these bounds a
    handful of such look-ups by one client took every replay reader and delayed resumes of real requests; with them
    one client's look-ups queue behind each other while other clients' run. Waiting rather than refusing, because an
    EventSource gives up for good on an error status; a client with ``queue_per_client`` waiting already is refused.
    """

    def __init__(
        self,
        per_client: int,
        total: int,
        queue_per_client: int = QUEUE_PER_CLIENT,
        on_event: Callable[[str], None] | None = None,
    ):
        self.per_client = max(1, per_client)
        self.total = max(1, total)
        self.queue_per_client = queue_per_client
        # Told "started", "waited_for_client" (its client had its share running), "waited_for_slot" (all `total`
        # slots were taken) and "refused" (its client's queue was full): the gateway counts them in its metrics.
        self.on_event = on_event or (lambda what: None)
        self.running = 0
        self._clients: dict[str, _Client] = {}
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the running loop

    @asynccontextmanager
    async def turn(self, client: str) -> AsyncIterator[None]:
        """Wait for ``client``'s turn and a free slot; TooManyBackfills when the client's queue is full."""
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(asyncio.Semaphore(self.per_client))
        if state.holders >= self.per_client + self.queue_per_client:
            self.on_event("refused")
            raise TooManyBackfills(f"client {client!r} has {state.holders} backfills waiting or running")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.total)
        state.holders += 1
        try:
            if state.turns.locked():
                self.on_event("waited_for_client")
            async with state.turns:
                if self._slots.locked():
                    self.on_event("waited_for_slot")
                async with self._slots:
                    self.on_event("started")
                    self.running += 1
                    try:
                        yield
                    finally:
                        self.running -= 1
        finally:
            state.holders -= 1
            if state.holders == 0:
                del self._clients[client]

    def waiting(self, client: str) -> int:
        """Backfills of ``client`` waiting or running."""
        state = self._clients.get(client)
        return state.holders if state is not None else 0

"""The hub: the subscribers of each request and the broadcast of its events to them; nothing of Kafka or history."""

from __future__ import annotations

import logging

from gateway.fanout.subscription import Out, Subscription
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class Hub:
    """Subscriptions by request id; ``publish`` offers an event to each, and drops one whose queue is full."""

    def __init__(self, metrics: GatewayMetrics | None = None):
        self.metrics = metrics or GatewayMetrics()
        self._subscribers: dict[str, set[Subscription]] = {}

    def attach(self, sub: Subscription) -> None:
        self._subscribers.setdefault(sub.request_id, set()).add(sub)
        self.metrics.subscribers.inc()

    def detach(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.request_id)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subscribers[sub.request_id]
            self.metrics.subscribers.dec()

    def subscribers(self, request_id: str) -> list[Subscription]:
        return list(self._subscribers.get(request_id, ()))

    def watched(self, request_id: str) -> bool:
        """Whether anyone subscribes to the request now."""
        return request_id in self._subscribers

    def count(self, request_id: str) -> int:
        """Subscriptions attached to the request now: from then on each gets every live event."""
        return len(self._subscribers.get(request_id, ()))

    def publish(self, request_id: str, out: Out) -> None:
        """Offer one event to every subscriber of the request; a subscriber too slow to take it is dropped."""
        for sub in self.subscribers(request_id):
            if not sub.offer(out):
                self.detach(sub)
                sub.close("slow")
                self.metrics.slow_disconnects.inc()
                log.info("request %s: slow subscriber disconnected", request_id)

    def end(
        self, request_id: str, reason: str, *, forwarded_only: bool = False, error: dict[str, str] | None = None
    ) -> None:
        """Close the request's subscriptions (only other gateways' upstreams with ``forwarded_only``), telling each
        ``error`` when given."""
        for sub in self.subscribers(request_id):
            if sub.forwarded or not forwarded_only:
                self.detach(sub)
                sub.close(reason, error)

    def close_all(self, reason: str) -> None:
        for request_id in list(self._subscribers):
            for sub in self.subscribers(request_id):
                sub.close(reason)

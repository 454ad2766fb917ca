"""Prometheus metrics of one gateway process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """One registry per gateway, so several gateways can live in one test process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "tokenrelay_gateway_connections",
            "Open HTTP connections (TOKENRELAY_HTTP_MAX_CONNECTIONS caps them).",
            registry=r,
        )
        self.active_streams = Gauge(
            "tokenrelay_gateway_active_streams", "Open SSE and streaming responses.", registry=r
        )
        self.subscribers = Gauge(
            "tokenrelay_gateway_subscribers",
            "Subscriptions attached to the hub (each gets every live event of its request from then on).",
            registry=r,
        )
        self.events_delivered = Counter(
            "tokenrelay_gateway_events_delivered", "SSE events written to subscribers.", registry=r
        )
        self.replays = Counter(
            "tokenrelay_gateway_replays", "Resumes and late subscriptions served, by source.", ["source"], registry=r
        )
        self.slow_disconnects = Counter(
            "tokenrelay_gateway_slow_subscriber_disconnects", "Subscribers dropped for not keeping up.", registry=r
        )
        self.hop_latency = Histogram(
            "tokenrelay_gateway_produce_to_deliver_seconds",
            "Time from the worker's event timestamp to the gateway writing it to a live subscriber.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tokenrelay_gateway_ttft_seconds",
            "Time from the request id's creation to the first token reaching the gateway's hub.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.hub_events = Counter("tokenrelay_gateway_hub_events", "Events read from the events topic.", registry=r)
        self.owned_partitions = Gauge(
            "tokenrelay_gateway_owned_partitions",
            "Events partitions this gateway reads (the gateways' consumer group assigns them).",
            registry=r,
        )
        self.followed = Gauge(
            "tokenrelay_gateway_followed_requests",
            "Requests followed from the gateway that reads their partition (one upstream stream each).",
            registry=r,
        )
        self.upstream_connects = Counter(
            "tokenrelay_gateway_upstream_connects",
            "Streams opened to the owning gateway of a followed request (first follows, resumes and moves).",
            registry=r,
        )
        self.undecodable = Counter(
            "tokenrelay_gateway_undecodable_events", "Events topic records that could not be decoded.", registry=r
        )
        self.requests_submitted = Counter(
            "tokenrelay_gateway_requests_submitted", "Requests produced to the requests topic.", registry=r
        )
        self.backfills = Counter(
            "tokenrelay_gateway_backfills",
            "Kafka scans for requests not in memory, by event: started, waited_for_client (its client had its share "
            "running), waited_for_slot (every slot was taken), refused (its client had too many waiting).",
            ["event"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "tokenrelay_gateway_quota_refusals",
            "Submits refused with 429 for an API key over a quota, by the limit it was over (requests, tokens, "
            "concurrent).",
            ["dimension"],
            registry=r,
        )
        self.backlog = Gauge("tokenrelay_gateway_request_backlog", "Lag of the worker group on requests.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

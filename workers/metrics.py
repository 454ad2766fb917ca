"""Prometheus metrics with vLLM's names, so existing dashboards work."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)

TTFT = Histogram(
    "time_to_first_token_seconds", "Time to first token in seconds.", buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
ITL = Histogram(
    "inter_token_latency_seconds",
    "Time between tokens of a request in seconds.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
E2E = Histogram(
    "e2e_request_latency_seconds",
    "Request latency from submission to its last token.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "request_queue_time_seconds",
    "Time from submission to processing start.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RUNNING = Gauge("num_requests_running", "Requests in the running batch.", registry=REGISTRY)
WAITING = Gauge("num_requests_waiting", "Requests waiting for a place in the batch.", registry=REGISTRY)
PROMPT_TOKENS = Counter("prompt_tokens", "Prompt tokens processed.", registry=REGISTRY)
PREFILL_TOKENS = Counter(
    "prefill_tokens",
    "Prompt tokens run through the built-in model (a request with n choices is prefilled once).",
    registry=REGISTRY,
)
GENERATION_TOKENS = Counter("generation_tokens", "Tokens generated.", registry=REGISTRY)
SUCCESS = Counter("request_success", "Requests finished, by reason.", ["finished_reason"], registry=REGISTRY)

BATCH_SLOTS = Gauge(
    "batch_slots",
    "Requests a served model may run at once on this worker (TOKENRELAY_MAX_BATCH_SIZE), by model.",
    ["model"],
    registry=REGISTRY,
)
BATCH_SLOTS_USED = Gauge(
    "batch_slots_used",
    "Requests a served model runs on this worker now (starting or in the engine).",
    ["model"],
    registry=REGISTRY,
)
KV_CACHE_USAGE = Gauge(
    "kv_cache_usage_perc",
    "Fraction of the engine's KV-cache budget the running requests reserve (1 = full), by model; engines that "
    "report it (the built-in one).",
    ["model"],
    registry=REGISTRY,
)

PREEMPTIONS = Counter(
    "num_preemptions", "Batch runs stopped for interactive requests (continued later).", ["model"], registry=REGISTRY
)
DEADLINE_IN_QUEUE = Counter(
    "queue_deadline_exceeded",
    "Requests that ended deadline_exceeded while waiting in a worker's look-ahead.",
    ["model", "priority"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class QueueSample:
    """One row of a served model's queue: waiting requests of one class and tenant (tenant None: not read yet)."""

    model: str
    priority: str
    tenant: str | None
    depth: int
    oldest_ms: int | None


class QueueCollector(Collector):
    """Queue depth and oldest wait per model, class and tenant, read from the served models when scraped."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], Iterable[QueueSample]]] = []

    def add(self, source: Callable[[], Iterable[QueueSample]]) -> None:
        self._sources.append(source)

    def remove(self, source: Callable[[], Iterable[QueueSample]]) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now_ms = time.time() * 1000
        depth = GaugeMetricFamily(
            "queue_depth",
            "Requests waiting in the worker's look-ahead, by model, class and tenant.",
            labels=["model", "priority", "tenant"],
        )
        oldest = GaugeMetricFamily(
            "queue_oldest_wait_seconds",
            "How long the oldest request waiting in the look-ahead has waited since it was submitted.",
            labels=["model", "priority", "tenant"],
        )
        unread = GaugeMetricFamily(
            "queue_unread",
            "Requests on the worker's partitions not read into its look-ahead yet (consumer lag), by model and class.",
            labels=["model", "priority"],
        )
        for source in list(self._sources):
            for sample in source():
                if sample.tenant is None:
                    unread.add_metric([sample.model, sample.priority], sample.depth)
                    continue
                labels = [sample.model, sample.priority, sample.tenant]
                depth.add_metric(labels, sample.depth)
                if sample.oldest_ms is not None:
                    oldest.add_metric(labels, max(0.0, now_ms - sample.oldest_ms) / 1000)
        yield depth
        yield oldest
        yield unread


QUEUES = QueueCollector()
REGISTRY.register(QUEUES)


def serve(port: int, host: str) -> WSGIServer | None:
    """Expose the metrics on ``host``:``port`` (port 0 = off); the server, to stop it."""
    if not port:
        return None
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server

"""Prometheus metrics with vLLM's names, so existing dashboards work."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
GENERATION_TOKENS = Counter("generation_tokens", "Tokens generated.", registry=REGISTRY)
SUCCESS = Counter("request_success", "Requests finished, by reason.", ["finished_reason"], registry=REGISTRY)


def serve(port: int, host: str) -> WSGIServer | None:
    """Expose the metrics on ``host``:``port`` (port 0 = off); the server, to stop it."""
    if not port:
        return None
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server

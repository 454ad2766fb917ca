"""The faust-streaming app: an agent over the events topic, changelog-backed tables, views for all instances."""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any

import aiohttp
import faust
from faust.web import Request, Response, View
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from schemas.errors import DecodeError, TokenRelayError
from schemas.records import TokenEvent
from services.analytics import aggregate, page
from services.kafka_auth import faust_credentials
from services.lag import LAG_INTERVAL_S, LagCollector, LagReader
from services.schema_registry import reading_codec
from services.settings import Settings
from services.topics import TopicSpec

log = logging.getLogger(__name__)

# How long a request's entry is kept: long enough to recognise a second terminal event of the same request
# (a worker that re-ran it), short enough that the table does not grow with every request ever served.
DONE_TTL_MS = 3600 * 1000
OPEN_TTL_MS = 24 * 3600 * 1000


def app_id(settings: Settings) -> str:
    """Faust app id: the consumer group and the prefix of the changelog topics."""
    return f"{settings.topic_prefix}analytics"


TABLES = ("requests", "partitions")
# Where an instance answers with the states of the partitions it processes, for the other instances' views.
LOCAL_REPORT_PATH = "/local/partitions"
PEER_TIMEOUT = aiohttp.ClientTimeout(total=5)


def changelog_specs(settings: Settings) -> list[TopicSpec]:
    """The tables' changelog topics, made before faust starts: faust's own creation races its metadata
    refresh on a fresh cluster and crashes the agent with a partition-count mismatch."""
    return [
        TopicSpec(f"{app_id(settings)}-{table}-changelog", settings.events_partitions, {"cleanup.policy": "compact"})
        for table in TABLES
    ]


def faust_broker(bootstrap: str) -> list[str]:
    """``host:port,host:port`` → faust's ``kafka://host:port`` URLs."""
    return [f"kafka://{part.strip()}" for part in bootstrap.split(",") if part.strip()]


class Expiry:
    """Per-partition deadlines of request entries, rebuilt from the table the first time a partition is seen."""

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[int, str]]] = {}

    def known(self, partition: int) -> bool:
        return partition in self._heaps

    def load(self, partition: int, items: list[tuple[str, dict[str, Any]]]) -> None:
        heap = [(deadline(v), k) for k, v in items if isinstance(v, dict) and v.get("p") == partition]
        heapq.heapify(heap)
        self._heaps[partition] = heap

    def push(self, partition: int, request_id: str, entry: dict[str, Any]) -> None:
        heapq.heappush(self._heaps.setdefault(partition, []), (deadline(entry), request_id))

    def due(self, partition: int, now_ms: int) -> list[tuple[int, str]]:
        heap = self._heaps.get(partition, [])
        out = []
        while heap and heap[0][0] <= now_ms:
            out.append(heapq.heappop(heap))
        return out


def deadline(entry: dict[str, Any]) -> int:
    done = entry.get("finished_at") is not None or entry.get("failed_at") is not None
    return int(entry.get("ts", 0)) + (DONE_TTL_MS if done else OPEN_TTL_MS)


class AnalyticsMetrics:
    """Prometheus metrics of one analytics instance: what it folded, and the stack's consumer lag."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "tokenrelay_analytics_events", "Events-topic records this instance folded.", registry=self.registry
        )
        self.undecodable = Counter(
            "tokenrelay_analytics_undecodable_events",
            "Events-topic records this instance could not decode (skipped).",
            registry=self.registry,
        )
        self.lag = LagCollector()
        self.registry.register(self.lag)


class _Web(AiohttpWeb):
    # faust's placeholder index ({"status": "OK"}) would take "/", where the charts page goes.
    production_blueprints = []


class AnalyticsApp(faust.App):
    def _new_web(self) -> AiohttpWeb:
        return _Web(self)


def create_app(settings: Settings) -> faust.App:
    """A faust app for ``settings``: broker, topics, group id, data dir and web port all come from them."""
    app = AnalyticsApp(
        app_id(settings),
        broker=faust_broker(settings.kafka_bootstrap),
        broker_credentials=faust_credentials(settings),
        datadir=str(settings.cache_dir / "analytics" / app_id(settings)),
        store="memory://",
        topic_partitions=settings.events_partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        web_port=settings.analytics_port,
        web_bind=settings.gateway_host,
        web_host=settings.gateway_host,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_router_enabled=False,
        web_tables_enabled=False,
        producer_acks=-1,
        logging_config=None,
        autodiscover=False,
    )
    window_s = settings.analytics_window_s
    codec = reading_codec(settings)
    events = app.topic(
        settings.events_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.events_partitions,
        internal=False,
    )
    # Both tables are written only with the partition of the event being processed, so every key lives in one
    # changelog partition and recovery replays it in order.
    requests = app.Table(TABLES[0], partitions=settings.events_partitions)
    partitions = app.Table(TABLES[1], partitions=settings.events_partitions)
    expiry = Expiry()
    metrics = AnalyticsMetrics()

    @app.agent(events)
    async def count(stream: faust.StreamT) -> None:
        async for event in stream.events():
            tp = event.message.tp
            offset = event.message.offset
            try:
                token_event = codec.decode_event(event.value)
            except DecodeError as exc:
                metrics.undecodable.inc()
                log.warning("skipping undecodable record %s@%d: %s", tp, offset, exc.message)
                continue
            metrics.events.inc()
            _apply(token_event, tp.partition, offset)

    @app.task
    async def read_lag() -> None:
        """The stack's consumer lag for /metrics, read every LAG_INTERVAL_S (faust cancels this at stop)."""
        reader = LagReader(settings, metrics.lag)
        try:
            while True:
                try:
                    await reader.read()
                except TokenRelayError as exc:
                    log.warning("cannot read the consumer groups' lag: %s", exc.message)
                await asyncio.sleep(LAG_INTERVAL_S)
        finally:
            await reader.close()

    def _apply(token_event: TokenEvent, partition: int, offset: int) -> None:
        if not expiry.known(partition):
            expiry.load(partition, list(requests.items()))
        state_key = str(partition)
        state = partitions.get(state_key) or aggregate.new_partition_state()
        info = requests.get(token_event.request_id)
        outcome = aggregate.apply_event(state, info, token_event, partition, offset, window_s)
        # The request entry is written before the partition state: see aggregate.apply_event.
        if outcome.request is not None:
            requests[token_event.request_id] = outcome.request
            expiry.push(partition, token_event.request_id, outcome.request)
        if outcome.state_changed:
            partitions[state_key] = state
        for due, request_id in expiry.due(partition, token_event.ts_ms):
            entry = requests.get(request_id)
            if entry is not None and deadline(entry) == due:
                del requests[request_id]

    def local_report() -> dict[str, Any]:
        """The partitions this instance processes now and their states (the table may also hold standby copies).

        Mid-rebalance or while tables recover from their changelogs it claims none: a partial state is not shown.
        """
        if app.rebalancing or getattr(app, "in_recovery", False):
            return {"owned": [], "partitions": {}}
        owned = sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == settings.events_topic)
        mine = {str(p) for p in owned}
        return {"owned": owned, "partitions": {k: v for k, v in partitions.items() if k in mine}}

    async def merged() -> dict[str, Any] | None:
        """The whole cluster's merged state: our partitions plus every other instance's, or None mid-rebalance."""
        reports = [local_report()]
        me = str(app.conf.canonical_url).rstrip("/")
        try:
            hosts = [h.rstrip("/") for h in app.router.table_metadata(TABLES[1])]
        except KeyError:
            hosts = []
        for host in hosts:
            if host == me:
                continue
            try:
                async with app.http_client.get(f"{host}{LOCAL_REPORT_PATH}", timeout=PEER_TIMEOUT) as response:
                    if response.status != 200:
                        return None
                    reports.append(await response.json())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.info("analytics peer %s did not answer: %s", host, exc)
                return None
        states = aggregate.combine_reports(reports, settings.events_partitions)
        return None if states is None else aggregate.merge_states(states.values())

    def rebalancing(view: View) -> Response:
        return view.json(
            {"error": {"code": "rebalancing", "message": "some events partitions have no analytics instance yet"}},
            status=503,
            headers={"Retry-After": "1"},
        )

    @app.page(LOCAL_REPORT_PATH)
    class LocalReportView(View):
        async def get(self, request: Request) -> Response:
            return self.json(local_report())

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/usage")
    class UsageView(View):
        async def get(self, request: Request) -> Response:
            m = await merged()
            return rebalancing(self) if m is None else self.json(aggregate.usage_view(m, window_s))

    @app.page("/latency")
    class LatencyView(View):
        async def get(self, request: Request) -> Response:
            m = await merged()
            return rebalancing(self) if m is None else self.json(aggregate.latency_view(m, window_s))

    @app.page("/")
    class IndexView(View):
        async def get(self, request: Request) -> Response:
            m = await merged()
            if m is None:
                return rebalancing(self)
            html = page.render(aggregate.usage_view(m, window_s), aggregate.latency_view(m, window_s))
            return self.html(html)

    return app

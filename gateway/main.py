"""Run the gateway: Kafka clients, relay, HTTP server; clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time

from aiohttp import web

from gateway.api.auth import Auth, key_id, stream_token_secret
from gateway.api.backlog import BacklogMonitor
from gateway.api.context import Gateway
from gateway.batch.handlers import add_routes as add_batch_routes
from gateway.batch.service import BatchService
from gateway.cluster.kafka_source import REPLAY_POOL_SIZE, KafkaEventSource
from gateway.cluster.owners import Owners
from gateway.cluster.peers import Peers
from gateway.cluster.queue_watch import QueueCollector, QueueWatch
from gateway.cluster.quota_log import QuotaLog, limits_by_tenant, limits_configured
from gateway.cluster.quotas import QuotaBook
from gateway.cluster.upstream import Follower
from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.relay import Relay
from gateway.http.app import build_app
from gateway.http.server import AcceptErrorLog, Listener, raise_fd_limit
from gateway.metrics import GatewayMetrics
from schemas.errors import TokenRelayError
from schemas.models import ModelDirectory
from services import tracing
from services.kafka import make_consumer, make_producer, start_client
from services.lifecycle import exit_after
from services.logs import configure_logging
from services.models_source import ModelsFollower
from services.schema_registry import prepare_codec
from services.settings import Settings
from services.topics import ensure_topics

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or a signal arrives when none is given)."""
    stop = stop or _signal_event()
    AcceptErrorLog().install(asyncio.get_running_loop())
    await ensure_topics(settings)
    codec = await prepare_codec(settings)
    metrics = GatewayMetrics()
    producer = make_producer(settings)
    await start_client(producer)
    owners = Owners(settings.gateway_url)
    source = KafkaEventSource(settings, owners)
    auth = Auth(settings)
    # The secret the gateways share proves an owner to its followers (and a follower to its owner): not the API keys.
    peers = Peers(stream_token_secret(settings), settings.gateway_url)
    upstream = Follower(owners, peers=peers, keepalive_s=settings.keepalive_s, metrics=metrics)
    relay = Relay(
        source,
        memory_events=settings.hub_memory_events,
        memory_total_events=settings.hub_memory_total_events,
        subscriber_buffer=settings.subscriber_buffer,
        max_requests=settings.hub_max_requests,
        metrics=metrics,
        codec=codec,
        upstream=upstream,
        backfills=BackfillLimit(
            settings.backfill_per_client,
            min(settings.backfill_concurrency, REPLAY_POOL_SIZE - 1),
            on_event=lambda event: metrics.backfills.labels(event).inc(),
        ),
    )
    source.on_reassign(relay.reassign)
    directory = ModelDirectory()
    follower = ModelsFollower(make_consumer(settings), settings.models_topic, directory, codec)
    backlog = BacklogMonitor(settings, metrics.backlog, models=lambda: directory.live(_now_ms()))
    directory.servable = backlog.servable
    limits = limits_by_tenant(settings, key_id)
    quotas = None
    if limits_configured(settings):
        book = QuotaBook(owners.me, limits, settings.quota_lease_ms)
        quotas = QuotaLog(settings, producer, book)
        quotas.metrics = metrics
    watch = QueueWatch(settings, producer, codec, directory, quotas)
    relay.tap = watch
    metrics.registry.register(QueueCollector(watch))
    runner: web.AppRunner | None = None
    following = asyncio.create_task(follower.run(), name="models")
    listener: Listener | None = None
    batches: BatchService | None = None
    try:
        if quotas is not None:
            await quotas.start()
        await relay.start()
        await watch.start()
        await backlog.start()

        async def not_ready() -> str:
            """Why requests cannot be served yet as far as Kafka goes ("" when they can; /readyz adds the models)."""
            if not follower.caught_up.is_set():
                return "reading_models"  # until then a model that is served would answer 404
            if not await backlog.topics_present({settings.events_topic, settings.control_topic}):
                return "topics_missing"
            return ""

        gateway = Gateway(
            settings,
            relay,
            producer,
            metrics,
            auth,
            backlog=backlog,
            ready_check=not_ready,
            models=directory,
            codec=codec,
            quotas=quotas,
            peers=peers,
        )
        if not auth.enabled:
            log.warning("no API keys configured (TOKENRELAY_API_KEYS): the gateway is open to anyone who reaches it")
        batches = BatchService(gateway)
        await batches.start()
        app = build_app(gateway)
        add_batch_routes(app, batches)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0, access_log=None)
        await runner.setup()
        listener = Listener(runner, settings)
        metrics.connections.set_function(lambda: listener.open if listener is not None else 0)
        await listener.start(backlog=2048)
        log.info("gateway listening on http://%s:%d/", settings.gateway_host, settings.gateway_port)
        await stop.wait()
        log.info("gateway stopping")
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        if listener is not None:
            listener.close()
        if batches is not None:
            await batches.stop()
        await relay.stop()  # closes every subscription, so streaming handlers return
        await watch.stop()
        if quotas is not None:
            await quotas.stop()
        await upstream.close()
        if runner is not None:
            await runner.cleanup()
        await backlog.stop()
        await producer.stop()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _signal_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        exit_after(what="gateway")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    return stop


# The relay keeps tens of thousands of live objects (recent events, subscriptions); with the default thresholds the
# collector walks all of them often, and those pauses were the whole produce-to-deliver tail (bench: p99 58 ms ->
# 14 ms at 5,000 events/s to 1,000 clients). Almost everything here is freed by reference counting anyway.
GC_THRESHOLDS = (100_000, 50, 1000)


def tune_gc() -> None:
    """Fewer, later cyclic collections: latency over the last few MB of cyclic garbage."""
    gc.freeze()  # objects from imports and start-up are never garbage; keep them out of every collection
    gc.set_threshold(*GC_THRESHOLDS)


def run_gateway(settings: Settings) -> int:
    tune_gc()
    raise_fd_limit()
    tracing.configure("tokenrelay-gateway")
    try:
        asyncio.run(serve(settings))
    except TokenRelayError as exc:
        log.error("gateway failed: %s", exc)
        return 1
    finally:
        tracing.shutdown()
    return 0


def main() -> int:
    settings = Settings.from_env()
    configure_logging(settings)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return run_gateway(settings)


if __name__ == "__main__":
    sys.exit(main())

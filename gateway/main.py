"""Run the gateway: Kafka clients, relay, HTTP server; clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable

from aiohttp import web

from gateway.api.auth import Auth, key_id
from gateway.api.backlog import BacklogMonitor
from gateway.api.context import Gateway
from gateway.batch.handlers import add_routes as add_batch_routes
from gateway.batch.service import BatchService
from gateway.cluster.kafka_source import REPLAY_POOL_SIZE, KafkaEventSource
from gateway.cluster.owners import Owners
from gateway.cluster.upstream import Follower
from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.relay import Relay
from gateway.http.app import build_app
from gateway.http.server import AcceptErrorLog, Listener, raise_fd_limit
from gateway.metrics import GatewayMetrics
from schemas.errors import TokenRelayError
from schemas.models import ModelDirectory
from services.kafka import make_consumer, make_producer, start_client
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
    upstream = Follower(owners, token=_upstream_token(auth), keepalive_s=settings.keepalive_s, metrics=metrics)
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
    runner: web.AppRunner | None = None
    following = asyncio.create_task(follower.run(), name="models")
    listener: Listener | None = None
    batches: BatchService | None = None
    try:
        await relay.start()
        await backlog.start()

        async def ready() -> bool:
            """Broker and topics there, and a live worker for every model the workers announced."""
            topics = await backlog.topics_present({settings.events_topic, settings.control_topic})
            return topics and not directory.unavailable(_now_ms())

        gateway = Gateway(
            settings, relay, producer, metrics, auth, backlog=backlog, ready_check=ready, models=directory, codec=codec
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
        await upstream.close()
        if runner is not None:
            await runner.cleanup()
        await backlog.stop()
        await producer.stop()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _upstream_token(auth: Auth) -> Callable[[str], str] | None:
    """How this gateway authorises its upstream streams: a watch token minted with its first key (the owner checks
    it like a client's; the client was already authorised here)."""
    if not auth.enabled:
        return None
    tenant = key_id(auth.keys[0])
    return lambda request_id: auth.sign(request_id, tenant)


def _signal_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
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
    try:
        asyncio.run(serve(settings))
    except TokenRelayError as exc:
        log.error("gateway failed: %s", exc)
        return 1
    return 0


def main() -> int:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return run_gateway(settings)


if __name__ == "__main__":
    sys.exit(main())

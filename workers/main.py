"""The worker process: its served models, the shared publisher, cancels and announcements, start and clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.codec import Codec, default_codec
from schemas.errors import ConfigError, KafkaUnavailable, TokenRelayError
from schemas.ids import is_model_name
from schemas.records import ModelInfo
from services import tracing
from services.kafka import make_consumer, make_producer
from services.lifecycle import exit_after
from services.logs import configure_logging
from services.schema_registry import prepare_codec
from services.settings import ENGINES, Settings, engine_of
from services.topics import describe_topics, ensure_topics
from workers import metrics
from workers.admission import Limits
from workers.announce import Announcer
from workers.control import CancelledIds, ControlReader
from workers.core import ModelCore
from workers.engine.port import EnginePort, as_port
from workers.engine.types import EngineLike
from workers.publisher import Publisher
from workers.served_model import ServedModel
from workers.stall import StallFence

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class KafkaClients:
    """Makes the worker's Kafka clients; tests and embedders pass their own."""

    settings: Settings

    def producer(self) -> AIOKafkaProducer:
        return make_producer(self.settings)

    def requests_consumer(self, model: str) -> AIOKafkaConsumer:
        s = self.settings
        return make_consumer(
            s,
            group_id=s.worker_group_for(model),
            auto_offset_reset="earliest",
            max_poll_interval_ms=300_000,
            session_timeout_ms=s.worker_session_timeout_ms,
            heartbeat_interval_ms=max(100, s.worker_session_timeout_ms // 3),
        )

    def consumer(self) -> AIOKafkaConsumer:
        return make_consumer(self.settings, auto_offset_reset="earliest")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One served model: the registered engine that runs it and where its weights come from."""

    engine: str
    source: str


def served_models(settings: Settings) -> dict[str, ModelSpec]:
    """Served name → engine and model source of each model this worker serves.

    ``TOKENRELAY_MODEL`` (``--model``) holds one model (``default``, a directory or a cached hub id, served under
    ``TOKENRELAY_SERVED_NAME``), or several ``NAME=SOURCE`` separated by commas: small models that fit one process.
    A source may name its engine, ``ENGINE:PATH`` (``vllm:/models/llama``); else ``TOKENRELAY_ENGINE`` runs it.
    """
    specs = [part.strip() for part in settings.model.split(",") if part.strip()] or ["default"]
    sources: dict[str, str] = {}
    if len(specs) == 1 and "=" not in specs[0]:
        sources[settings.served_model] = specs[0]
    else:
        for spec in specs:
            name, sep, source = (part.strip() for part in spec.partition("="))
            if not sep or not source:
                raise ConfigError(f"TOKENRELAY_MODEL entry {spec!r}: several models are given as NAME=PATH_OR_ID")
            if name in sources:
                raise ConfigError(f"TOKENRELAY_MODEL serves {name!r} twice")
            sources[name] = source
    models: dict[str, ModelSpec] = {}
    for name, source in sources.items():
        if not is_model_name(name):
            raise ConfigError(
                f"served model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), not 'dlq'"
            )
        engine, path = engine_of(source)
        models[name] = ModelSpec(engine or settings.engine, path)
    return models


def load_engines(settings: Settings) -> dict[str, EnginePort]:
    """The engines this worker serves, by served name, each behind the engine port."""
    engines: dict[str, EnginePort] = {}
    for name, spec in served_models(settings).items():
        module = importlib.import_module(ENGINES[spec.engine])
        engines[name] = module.load(settings, name, spec.source)
        log.info("model %s: %s engine, %s", name, spec.engine, spec.source)
    return engines


def model_info(settings: Settings, name: str, engine: EnginePort, worker: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        worker=worker,
        context_length=int(engine.max_positions),
        ts_ms=int(time.time() * 1000),
        has_chat_template=bool(engine.has_chat_template),
        max_batch_size=settings.max_batch_size,
        max_tokens_limit=settings.max_tokens_limit,
        engine=engine.kind,
        device=engine.device,
        source=_source_of(settings, name, engine),
    )


def _source_of(settings: Settings, name: str, engine: EnginePort) -> str:
    if engine.kind == "synthetic":
        return "synthetic"
    spec = served_models(settings).get(name)
    source = spec.source if spec is not None else settings.model
    return "built-in" if source == "default" else source


def limits_of(settings: Settings, name: str, engine: EnginePort) -> Limits:
    return Limits(
        model=name,
        context_length=int(engine.max_positions),
        max_prompt_tokens=settings.max_prompt_tokens,
        max_tokens_limit=settings.max_tokens_limit,
        has_chat_template=bool(engine.has_chat_template),
        max_stalled_runs=settings.max_stalled_runs,
    )


class Worker:
    """One worker process: one ServedModel per engine (each in its model's consumer group), sharing a publisher."""

    def __init__(
        self,
        settings: Settings,
        engines: Mapping[str, EnginePort | EngineLike] | EnginePort | EngineLike,
        clients: KafkaClients | None = None,
        codec: Codec | None = None,
    ):
        if not isinstance(engines, Mapping):
            engines = {settings.served_model: engines}
        ports = {name: as_port(engine) for name, engine in engines.items()}
        self.settings = settings
        self.clients = clients or KafkaClients(settings)
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.codec = codec or default_codec()
        fence = StallFence.for_session(settings.worker_session_timeout_ms, time.monotonic())
        self.publisher = Publisher(self.clients.producer, settings.events_topic, self.codec, fence)
        self.cancelled = CancelledIds()
        self.control = ControlReader(self.clients.consumer(), settings.control_topic, self._on_cancel, self.codec)
        self.models: dict[str, ServedModel] = {}
        for name, engine in ports.items():
            core = ModelCore(engine, limits_of(settings, name, engine), self.publisher, self.worker_id, self.cancelled)
            self.models[name] = ServedModel(
                settings,
                core,
                self.clients.requests_consumer(name),
                self.clients.consumer(),
                self.publisher,
                self.codec,
            )
        infos = [model_info(settings, n, e, self.worker_id) for n, e in ports.items()]
        self.announcer = Announcer(
            self.publisher, settings.models_topic, infos, settings.model_heartbeat_ms, self.codec
        )
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()
        for served in self.models.values():
            served.stop()

    async def run(self) -> None:
        counts = await self._ensure_topics()
        await self.publisher.start()
        control = self.settings.control_topic
        tasks = [asyncio.create_task(self.control.run(counts[control]), name="control")]
        try:
            await self._wait_or_stop(self.control.ready.wait())
            event_partitions = counts[self.settings.events_topic] or self.settings.events_partitions
            for served in self.models.values():
                await served.start(event_partitions)
            tasks += [asyncio.create_task(s.serve(), name=f"serve-{n}") for n, s in self.models.items()]
            tasks.append(asyncio.create_task(self.announcer.run(), name="announce"))
            await self._wait_or_stop(asyncio.gather(*(s.assigned.wait() for s in self.models.values())))
            if not self._stopping.is_set():
                self.ready.set()
                log.info("worker %s ready: serving %s", self.worker_id, ", ".join(self.models))
            await self._stopping.wait()
            await asyncio.gather(*(s.drain(SHUTDOWN_GRACE_S) for s in self.models.values()))
            await self.announcer.withdraw()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.publisher.stop()
            for served in self.models.values():
                await served.close()

    async def _ensure_topics(self) -> dict[str, int]:
        """Create the topics, waiting for the broker as long as it takes; their partition counts."""
        attempt = 0
        while True:
            try:
                await ensure_topics(self.settings, models=list(self.models))
                return await describe_topics(self.settings, [self.settings.events_topic, self.settings.control_topic])
            except KafkaUnavailable as exc:
                if self._stopping.is_set():
                    raise
                attempt += 1
                if (
                    attempt & (attempt - 1) == 0
                ):  # 1, 2, 4, 8, ...: waiting for an admin logs a few lines, not one a second
                    log.warning("cannot create the topics yet (%s); retrying (attempt %d)", exc.message, attempt)
                await asyncio.sleep(1.0)

    async def _wait_or_stop(self, awaitable: Awaitable[object]) -> None:
        waiter = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (waiter, stopper):
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(waiter, stopper, return_exceptions=True)
        if waiter.done() and not waiter.cancelled() and (exc := waiter.exception()) is not None:
            raise exc

    def _on_cancel(self, request_id: str) -> None:
        for served in self.models.values():
            served.cancel(request_id)


async def serve(settings: Settings, engines: Mapping[str, EnginePort] | None = None) -> None:
    """Run a worker until SIGINT/SIGTERM (or cancellation)."""
    # Schema registration runs while the model loads (the embedded registry may still be starting).
    codec_task = asyncio.create_task(prepare_codec(settings))
    try:
        if engines is None:
            engines = await asyncio.to_thread(load_engines, settings)
        codec = await codec_task
    finally:
        codec_task.cancel()
    metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
    worker = Worker(settings, engines, codec=codec)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        exit_after(what="worker")
        worker.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    await worker.run()


def run_worker(settings: Settings) -> int:
    tracing.configure("tokenrelay-worker")
    try:
        asyncio.run(serve(settings))
    except TokenRelayError as exc:
        log.error("worker failed: %s", exc.message)
        return 1
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    _settings = Settings.from_env()
    configure_logging(_settings)
    sys.exit(run_worker(_settings))

"""The worker process: Kafka intake → engine → token events, with control, metrics and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from schemas.codec import default_codec
from schemas.errors import DecodeError, TokenRelayError, ValidationError
from schemas.ids import is_request_id, request_id_time_ms
from schemas.records import Failed, Finished, InferenceRequest, Started, Usage
from schemas.sampling import SamplingParams
from services.kafka import make_consumer, make_producer, start_client
from services.settings import Settings
from services.topics import ensure_topics
from workers import metrics
from workers.control import CancelledIds, ControlReader
from workers.engine.types import EngineLike, EngineRequest, StepOutput
from workers.history import Prior, read_prior
from workers.intake import OffsetTracker, dead_letter
from workers.publisher import Publisher, RunStream

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
COMMIT_INTERVAL_S = 0.2


@dataclass(slots=True)
class Active:
    """A request this worker is running: where it came from and how far it got."""

    request: InferenceRequest
    tp: TopicPartition
    offset: int
    stream: RunStream
    prompt_tokens: int
    completion: int
    created_ms: int
    started: float = field(default_factory=time.monotonic)
    last_token: float | None = None
    first_token_ms: int = 0


def load_engine(settings: Settings) -> EngineLike:
    if settings.engine == "synthetic":
        from workers.synthetic import SyntheticEngine

        log.warning("synthetic engine: %.0f tokens/s per request, no model", settings.synthetic_tokens_per_s)
        return SyntheticEngine(settings.synthetic_tokens_per_s, settings.max_batch_size)
    from workers.engine.engine import Engine
    from workers.model.registry import resolve_model

    engine = Engine.load(resolve_model(settings.model), settings.device, settings.dtype, settings.max_batch_size)
    engine.name = settings.model
    return engine


class Worker:
    """One worker: a member of the requests consumer group that streams token events for what it takes."""

    def __init__(self, settings: Settings, engine: EngineLike):
        self.settings = settings
        self.engine = engine
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.producer = make_producer(settings)
        self.publisher = Publisher(self.producer, settings.events_topic)
        self.consumer = make_consumer(
            settings,
            group_id=settings.worker_group,
            auto_offset_reset="earliest",
            max_poll_interval_ms=300_000,
            session_timeout_ms=settings.worker_session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.worker_session_timeout_ms // 3),
        )
        self.history = make_consumer(settings, auto_offset_reset="earliest")
        self.cancelled = CancelledIds()
        self.control = ControlReader(settings, self._on_cancel)
        self.active: dict[str, Active] = {}
        # The engine knows a run by its run id, not its request id: after a rebalance the same request can be
        # taken again while the engine still winds down the abandoned run, and the two must never be confused.
        self.runs: dict[str, Active] = {}
        self.trackers: dict[TopicPartition, OffsetTracker] = {}
        self.assigned_end: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._adds: list[EngineRequest] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._n_event_partitions = settings.events_partitions

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        await ensure_topics(self.settings)
        await start_client(self.producer)
        await start_client(self.history)
        self.publisher.start()
        partitions = await self._partitions(self.settings.events_topic)
        self._n_event_partitions = partitions or self._n_event_partitions
        control_partitions = await self._partitions(self.settings.control_topic)
        tasks = [asyncio.create_task(self.control.run(control_partitions), name="control")]
        await self.control.ready.wait()
        self.consumer.subscribe([self.settings.requests_topic], listener=_Listener(self))
        await start_client(self.consumer)
        log.info("worker %s serving %s", self.worker_id, self.engine.name)
        tasks += [
            asyncio.create_task(self._engine_loop(), name="engine"),
            asyncio.create_task(self._commit_loop(), name="commit"),
        ]
        try:
            await self._intake_loop()
            await self._drain(SHUTDOWN_GRACE_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._commit()
            await self.consumer.stop()
            await self.publisher.stop()
            await self.history.stop()
            await self.producer.stop()
            self._executor.shutdown(wait=True)

    async def _partitions(self, topic: str) -> int:
        return len(await self.producer.partitions_for(topic))

    # Intake ------------------------------------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        while not self._stopping.is_set():
            capacity = self.settings.max_batch_size - len(self.active)
            assignment = self.consumer.assignment()
            if capacity <= 0:
                self.consumer.pause(*assignment)
                await self._sleep(0.01)
                continue
            paused = self.consumer.paused()
            if paused:
                self.consumer.resume(*paused)
            try:
                batches = await self.consumer.getmany(timeout_ms=100, max_records=capacity)
            except KafkaError as exc:
                log.warning("fetching requests failed: %s", exc)
                await self._sleep(0.5)
                continue
            for tp, records in batches.items():
                for record in records:
                    tracker = self.trackers.get(tp)
                    if tracker is None:
                        break  # revoked meanwhile; the new owner reads it again
                    tracker.take(record.offset)
                    await self._take(tp, record)

    async def _take(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        try:
            request = _check_record(default_codec().decode_request(record.value))
        except (DecodeError, ValidationError) as exc:
            await dead_letter(self.producer, self.settings, record, exc)
            self._done(tp, record.offset)
            return
        rid = request.request_id
        created_ms = request.created_ms or (request_id_time_ms(rid) if is_request_id(rid) else _now_ms())
        prior = Prior()
        if record.offset < self.assigned_end.get(tp, 0):
            prior = await read_prior(
                self.history, self.settings.events_topic, self._n_event_partitions, rid, created_ms
            )
            if prior.terminal:
                log.info("request %s: already finished in the log; skipping", rid)
                self._done(tp, record.offset)
                return
        stream = RunStream(self.publisher, rid, uuid.uuid4().hex)
        failure = self._limits(request)
        prompt_ids: list[int] = []
        if failure is None:
            messages = [(m.role, m.content) for m in request.messages] if request.messages else None
            prompt_ids = self.engine.encode_prompt(request.prompt, messages)
            limit = min(self.settings.max_prompt_tokens, self.engine.max_positions - 1)
            if len(prompt_ids) > limit:
                failure = Failed("prompt_too_long", f"prompt has {len(prompt_ids)} tokens; the limit is {limit}")
        if failure is not None:
            log.info("request %s: failed: %s", rid, failure.message)
            self._finish_later(tp, record.offset, stream.finish(failure), rid, None)
            return
        now = _now_ms()
        stream.emit(
            Started(
                worker=self.worker_id,
                model=self.engine.name,
                prompt_tokens=len(prompt_ids),
                queue_ms=max(0, now - created_ms),
                tenant=request.tenant,
                continues_run_id=prior.run_id,
                continued_tokens=len(prior.token_ids),
                continued_text=prior.text,
            )
        )
        metrics.QUEUE_TIME.observe(max(0, now - created_ms) / 1000)
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        active = Active(request, tp, record.offset, stream, len(prompt_ids), len(prior.token_ids), created_ms)
        self.active[rid] = active
        if prior.run_id:
            log.info("request %s: continuing run %s after %d tokens", rid, prior.run_id, len(prior.token_ids))
        if rid in self.cancelled or len(prior.token_ids) >= request.max_tokens:
            self._finish(active, "cancelled" if rid in self.cancelled else "length")
            return
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=request.stop,
        )
        self.runs[stream.run_id] = active
        self._adds.append(EngineRequest(stream.run_id, prompt_ids, params, list(prior.token_ids), prior.text))
        self._wake.set()

    def _limits(self, request: InferenceRequest) -> Failed | None:
        if request.deadline_ms is not None and request.deadline_ms < _now_ms():
            return Failed("deadline_exceeded", f"deadline {request.deadline_ms} passed before the request started")
        if not 1 <= request.max_tokens <= self.settings.max_tokens_limit:
            return Failed("max_tokens_invalid", f"max_tokens must be between 1 and {self.settings.max_tokens_limit}")
        return None

    # Engine ------------------------------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
            for request in adds:
                self.engine.add(request)
            for rid in aborts:
                self.engine.abort(rid)
            if not self.engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            outputs = await loop.run_in_executor(self._executor, self.engine.step)
            for out in outputs:
                self._on_output(out)
            metrics.RUNNING.set(self.engine.num_running)
            metrics.WAITING.set(self.engine.num_waiting)

    def _on_output(self, out: StepOutput) -> None:
        active = self.runs.get(out.request_id)  # the engine's request id is the run id
        if active is None:
            return
        if out.finish_reason is not None:
            del self.runs[out.request_id]
        if active.stream.abandoned:
            return
        if out.token_ids:
            now = time.monotonic()
            if active.last_token is None:
                metrics.TTFT.observe(now - active.started)
                active.first_token_ms = int((now - active.started) * 1000)
            else:
                metrics.ITL.observe(now - active.last_token)
            active.last_token = now
            active.completion += len(out.token_ids)
            metrics.GENERATION_TOKENS.inc(len(out.token_ids))
        active.stream.tokens(out.token_ids, out.text)
        if out.finish_reason is not None:
            self._finish(active, "cancelled" if out.finish_reason == "aborted" else out.finish_reason)

    def _finish(self, active: Active, reason: str) -> None:
        finished = Finished(
            finish_reason=reason,
            usage=Usage(active.prompt_tokens, active.completion),
            ttft_ms=active.first_token_ms,
            total_ms=int((time.monotonic() - active.started) * 1000),
        )
        rid = active.request.request_id
        log.info("request %s: finished (%s, %d tokens)", rid, reason, active.completion)
        metrics.E2E.observe(max(0.0, _now_ms() - active.created_ms) / 1000)
        self._finish_later(active.tp, active.offset, active.stream.finish(finished), rid, reason)

    def _finish_later(
        self, tp: TopicPartition, offset: int, ack: asyncio.Future[None], request_id: str, reason: str | None
    ) -> None:
        """Close the request's offset once its terminal event is acknowledged; ``reason`` None for a Failed."""

        def acked(fut: asyncio.Future[None]) -> None:
            active = self.active.get(request_id)
            if active is not None and active.offset == offset and active.tp == tp:
                del self.active[request_id]
            if fut.cancelled() or fut.exception() is not None:
                log.error("request %s: terminal event not acknowledged; leaving its offset open", request_id)
                return
            if reason is not None:  # request_success_total counts Finished requests only, as vLLM's does
                metrics.SUCCESS.labels(finished_reason=reason).inc()
            self._done(tp, offset)

        ack.add_done_callback(acked)

    def _on_cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)
        active = self.active.get(request_id)
        if active is not None and active.stream.run_id in self.runs:
            self._aborts.append(active.stream.run_id)
            self._wake.set()

    # Offsets -----------------------------------------------------------------------------------------------

    def _done(self, tp: TopicPartition, offset: int) -> None:
        tracker = self.trackers.get(tp)
        if tracker is not None:
            tracker.done(offset)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self._commit()

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, tracker in self.trackers.items():
            position = tracker.committable()
            if position is not None and position != self._committed.get(tp) and (only is None or tp in only):
                offsets[tp] = OffsetAndMetadata(position, "")
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
            for tp, meta in offsets.items():
                self._committed[tp] = meta.offset
        except (KafkaError, AssertionError) as exc:
            log.warning("commit failed (will retry): %s", exc)

    # Rebalance and shutdown --------------------------------------------------------------------------------

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Stop the runs of revoked partitions without a terminal event; the new owner continues them from the log."""
        for rid, active in list(self.active.items()):
            if active.tp in revoked and not active.stream.abandoned:
                log.info("request %s: partition revoked; abandoning run %s", rid, active.stream.run_id)
                active.stream.abandoned = True
                if active.stream.run_id in self.runs:
                    self._aborts.append(active.stream.run_id)
        self._wake.set()
        await self.publisher.drain()
        await self._commit(only=revoked)
        for tp in revoked:
            self.trackers.pop(tp, None)
            self._committed.pop(tp, None)
        for rid in [rid for rid, a in self.active.items() if a.tp in revoked and a.stream.abandoned]:
            del self.active[rid]

    async def assign(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            ends = await self.consumer.end_offsets(list(assigned))
            self.assigned_end.update(ends)
        for tp in assigned:
            self.trackers[tp] = OffsetTracker()
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    async def _drain(self, grace_s: float) -> None:
        """Let running requests finish for up to ``grace_s``, then abandon the rest for another worker."""
        self.consumer.pause(*self.consumer.assignment())
        deadline = time.monotonic() + grace_s
        while self.active and time.monotonic() < deadline:  # noqa: ASYNC110 - many places finish requests
            await asyncio.sleep(0.05)
        if self.active:
            log.info("shutting down: abandoning %d running requests", len(self.active))
            await self.revoke({a.tp for a in self.active.values()})
        await self.publisher.drain()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: Worker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.worker.assign(set(assigned))


def _check_record(request: InferenceRequest) -> InferenceRequest:
    if not request.request_id:
        raise ValidationError("request has no request_id")
    return request


def _now_ms() -> int:
    return int(time.time() * 1000)


async def serve(settings: Settings, engine: EngineLike | None = None) -> None:
    """Run a worker until SIGINT/SIGTERM (or cancellation)."""
    if engine is None:
        engine = await asyncio.to_thread(load_engine, settings)
    metrics.serve(settings.worker_metrics_port)
    worker = Worker(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def run_worker(settings: Settings) -> int:
    try:
        asyncio.run(serve(settings))
    except TokenRelayError as exc:
        log.error("worker failed: %s", exc.message)
        return 1
    return 0


if __name__ == "__main__":
    _settings = Settings.from_env()
    logging.basicConfig(
        level=_settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    sys.exit(run_worker(_settings))

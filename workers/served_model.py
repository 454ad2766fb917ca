"""One served model's Kafka side: its requests topic in its workers' group, offsets, rebalances, retakes, the DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from schemas.codec import Codec, default_codec
from schemas.errors import DecodeError, TokenRelayError, ValidationError
from schemas.ids import is_request_id, request_id_time_ms
from schemas.records import InferenceRequest
from services.kafka import start_client
from services.settings import Settings
from workers.admission import Refusal
from workers.core import ModelCore
from workers.history import Prior, read_prior
from workers.intake import OffsetTracker, dead_letter
from workers.ledger import Ticket
from workers.publisher import Publisher, RunBroken

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2
RETRY_S = 0.5
PRIOR_TIMEOUT_S = 30.0


class ServedModel:
    """Takes requests of ``requests.<name>`` for a ModelCore and commits each offset once its request has ended.

    A request's offset is committed only after its terminal event is acknowledged, so a request whose worker dies
    is taken up again by another member of the group; a run that lost an event is taken up again here.
    """

    def __init__(
        self,
        settings: Settings,
        core: ModelCore,
        consumer: AIOKafkaConsumer,
        history: AIOKafkaConsumer,
        publisher: Publisher,
        codec: Codec | None = None,
    ):
        self.settings = settings
        self.name = core.limits.model
        self.topic = settings.requests_topic_for(self.name)
        self.core = core
        core.on_closed = self._closed
        core.on_retake = self._retake
        self.consumer = consumer
        self.history = history
        self.publisher = publisher
        self.codec = codec or default_codec()
        self.trackers: dict[TopicPartition, OffsetTracker] = {}
        self.assigned = asyncio.Event()
        self._assigned_end: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._history_lock = asyncio.Lock()
        self._retakes: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._n_event_partitions = settings.events_partitions

    async def start(self, event_partitions: int) -> None:
        self._n_event_partitions = event_partitions
        await start_client(self.history, timeout_s=None)
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        await start_client(self.consumer, timeout_s=None)

    async def serve(self) -> None:
        """Intake until ``stop()``; the engine and commit loops run beside it."""
        tasks = [
            asyncio.create_task(self.core.run_engine(), name=f"engine-{self.name}"),
            asyncio.create_task(self._commit_loop(), name=f"commit-{self.name}"),
        ]
        try:
            await self._intake_loop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()
        self.core.changed.set()

    # Intake ------------------------------------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        while not self._stopping.is_set():
            capacity = self.settings.max_batch_size - len(self.core.ledger)
            if capacity <= 0 or self.core.solo is not None:
                self.consumer.pause(*self.consumer.assignment())
                await self._wait_changed(0.5)
                continue
            paused = self.consumer.paused()
            if paused:
                self.consumer.resume(*paused)
            try:
                batches = await self.consumer.getmany(timeout_ms=100, max_records=capacity)
            except KafkaError as exc:
                log.warning("fetching requests failed (will retry): %s", exc)
                await self._sleep(RETRY_S)
                continue
            for tp, records in batches.items():
                for record in records:
                    tracker = self.trackers.get(tp)
                    if tracker is None:
                        break  # revoked meanwhile; the new owner reads it again
                    tracker.take(record.offset)
                    await self._take(tp, record)

    async def _take(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            request = _checked(self.codec.decode_request(record.value))
        except (DecodeError, ValidationError) as exc:
            await self._dead_letter(record, exc)
            self._done(tp, record.offset)
            return
        rid = request.request_id
        created_ms = request.created_ms or request_id_time_ms(rid)
        ticket = Ticket(request, (tp, record), created_ms)
        await self._admit(ticket, check_log=record.offset < self._assigned_end.get(tp, 0))

    async def _admit(self, ticket: Ticket, *, check_log: bool) -> None:
        prior = await self._prior(ticket) if check_log else Prior()
        if prior is None:
            return  # stopping, or no longer ours
        if prior.terminal:
            log.info("request %s: already ended in the log; skipping", ticket.request.request_id)
            self._closed(ticket)
            return
        decision, prompt_ids = self.core.decide(ticket, prior)
        if isinstance(decision, Refusal):
            if decision.dead_letter:
                _, record = ticket.source
                await self._dead_letter(record, TokenRelayError(decision.failed.message, code=decision.failed.code))
            self.core.refuse(ticket, decision.failed)
            return
        while decision.solo and len(self.core.ledger) > 0 and not self._stopping.is_set():
            await self.core.wait_changed()  # a suspect request runs alone: it must not take others down with it
        self.core.run(ticket, decision, prompt_ids, prior)

    async def _prior(self, ticket: Ticket) -> Prior | None:
        """What earlier runs left in the log; retried through broker outages."""
        rid = ticket.request.request_id
        while not self._stopping.is_set() and self._owns(ticket):
            try:
                async with self._history_lock:
                    return await asyncio.wait_for(
                        read_prior(
                            self.history,
                            self.settings.events_topic,
                            self._n_event_partitions,
                            rid,
                            ticket.created_ms,
                            self.codec,
                        ),
                        PRIOR_TIMEOUT_S,
                    )
            except (KafkaError, TimeoutError) as exc:
                log.warning("request %s: reading its log failed (will retry): %s", rid, exc)
                await self._sleep(RETRY_S)
        return None

    def _retake(self, ticket: Ticket) -> None:
        if not self._owns(ticket) or self._stopping.is_set():
            return
        task = asyncio.create_task(self._retake_when_healthy(ticket), name=f"retake-{ticket.request.request_id}")
        self._retakes.add(task)
        task.add_done_callback(self._retakes.discard)

    async def _retake_when_healthy(self, ticket: Ticket) -> None:
        await self.publisher.healthy.wait()
        if self._owns(ticket) and self.core.ledger.get(ticket.request.request_id) is None:
            await self._admit(ticket, check_log=True)

    def _owns(self, ticket: Ticket) -> bool:
        tp, record = ticket.source
        tracker = self.trackers.get(tp)
        return tracker is not None and record.offset in tracker.open

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], error: TokenRelayError) -> None:
        while True:
            try:
                await dead_letter(self.publisher, self.settings, record, error)
                return
            except RunBroken:
                await self.publisher.healthy.wait()

    # Offsets -----------------------------------------------------------------------------------------------

    def _closed(self, ticket: Ticket) -> None:
        tp, record = ticket.source
        self._done(tp, record.offset)

    def _done(self, tp: TopicPartition, offset: int) -> None:
        tracker = self.trackers.get(tp)
        if tracker is not None:
            tracker.done(offset)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self.commit()

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
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
        self.core.abandon(lambda ticket: ticket.source[0] in revoked)
        await self.publisher.drain()
        await self.commit(only=revoked)
        for tp in revoked:
            self.trackers.pop(tp, None)
            self._committed.pop(tp, None)

    async def assign(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            try:
                self._assigned_end.update(await self.consumer.end_offsets(list(assigned)))
            except KafkaError as exc:
                # Unknown ends: every record of these partitions is checked against the log before it runs.
                log.warning("end offsets of %s unknown (%s)", sorted(tp.partition for tp in assigned), exc)
                self._assigned_end.update(dict.fromkeys(assigned, 1 << 62))
        for tp in assigned:
            self.trackers[tp] = OffsetTracker()
        self.assigned.set()
        log.info("model %s: assigned %s", self.name, sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    async def drain(self, grace_s: float) -> None:
        """Let running requests finish for up to ``grace_s``, then abandon the rest for another worker."""
        self.stop()
        self.consumer.pause(*self.consumer.assignment())
        deadline = time.monotonic() + grace_s
        while len(self.core.ledger) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.core.wait_changed(), max(0.0, deadline - time.monotonic()))
        for task in list(self._retakes):
            task.cancel()
        if len(self.core.ledger):
            log.info("model %s: shutting down, abandoning %d running requests", self.name, len(self.core.ledger))
            await self.revoke(set(self.trackers))
        await self.publisher.drain()
        await self.commit()

    async def close(self) -> None:
        await self.consumer.stop()
        await self.history.stop()
        self.core.close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _wait_changed(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.core.wait_changed(), seconds)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, served: ServedModel):
        self.served = served

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.served.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.served.assign(set(assigned))


def _checked(request: InferenceRequest) -> InferenceRequest:
    if not is_request_id(request.request_id):
        raise ValidationError(f"request_id {request.request_id[:64]!r} is not a UUIDv7")
    return request

"""One served model's Kafka side: its two class topics in its workers' group, the look-ahead, offsets, the DLQ."""

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
from schemas.records import PRIORITIES, InferenceRequest
from services import tracing
from services.kafka import start_client
from services.logs import request_context
from services.settings import Settings
from workers import metrics
from workers.core import ModelCore
from workers.deferral import Deferred, Position
from workers.dispatch import Dispatcher
from workers.history import Prior, read_prior
from workers.intake import OffsetTracker, dead_letter, owned
from workers.ledger import Ticket
from workers.publisher import Publisher, RunBroken
from workers.scheduling import INTERACTIVE, Scheduler

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2
RETRY_S = 0.5
PRIOR_TIMEOUT_S = 30.0
REFILL_PASS_S = 1.0  # a look for due deferred requests at least this often
STATS_EVERY_S = 0.5
MAX_DEFERRED = 100_000  # positions of requests read but not held, per class
REREAD_BATCH = 1000
UNKNOWN_END = 1 << 62  # a partition's end at assignment, until looked up: every record counts as possibly run before


class ServedModel:
    """Takes requests of ``requests.<name>`` and ``batch.<name>`` for a ModelCore; commits each offset once its
    request has ended.

    Records are read into a bounded look-ahead per class (a class's partitions are paused while its look-ahead is
    full, so a batch backlog never holds back interactive records; a tenant's requests past its share are kept as
    positions and read again in turn); the ``Dispatcher`` runs what the pure ``Scheduler`` picks.
    A request's offset is committed only after its terminal event is acknowledged (commits stay at the lowest
    unfinished offset, waiting ones included), so a request whose worker dies is taken up again by another member
    of the group; a run that lost an event, or was preempted, is taken up again here from the log.
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
        self.topics = {priority: settings.requests_topic_for(self.name, priority) for priority in PRIORITIES}
        self._priority_of = {topic: priority for priority, topic in self.topics.items()}
        self.core = core
        core.on_closed = self._closed
        core.on_retake = self._retake
        self.scheduler: Scheduler[Ticket] = Scheduler(
            settings.tenant_weight_map,
            preemption=settings.preemption,
            min_progress=settings.preempt_min_tokens,
            after_steps=settings.preempt_after_steps,
        )
        self.dispatcher = Dispatcher(settings, core, self.scheduler, self)
        core.on_tokens = self.dispatcher.served
        self.deferred: Deferred[tuple[TopicPartition, int]] = Deferred(
            settings.scheduler_tenant_lookahead, MAX_DEFERRED
        )
        self.consumer = consumer
        self.history = history
        self.publisher = publisher
        self.codec = codec or default_codec()
        self.trackers: dict[TopicPartition, OffsetTracker] = {}
        self.assigned = asyncio.Event()
        self._assigned_end: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._history_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._n_event_partitions = settings.events_partitions
        self._room = asyncio.Event()  # the look-ahead has room again
        self._refill = asyncio.Event()  # requests left the look-ahead: deferred ones may be due
        self._samples: tuple[metrics.QueueSample, ...] = ()
        self._sampled = 0.0
        metrics.QUEUES.add(self.queue_samples)

    async def start(self, event_partitions: int) -> None:
        self._n_event_partitions = event_partitions
        await start_client(self.history, timeout_s=None)
        self.consumer.subscribe(list(self.topics.values()), listener=_Listener(self))
        await start_client(self.consumer, timeout_s=None)

    async def serve(self) -> None:
        """Intake until ``stop()``; the engine and commit loops run beside it."""
        tasks = [
            asyncio.create_task(self.core.run_engine(), name=f"engine-{self.name}"),
            asyncio.create_task(self._commit_loop(), name=f"commit-{self.name}"),
            asyncio.create_task(self.dispatcher.run(), name=f"schedule-{self.name}"),
            asyncio.create_task(self._refill_loop(), name=f"refill-{self.name}"),
        ]
        try:
            await self._fetch_loop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()
        self.dispatcher.stop()
        self.core.changed.set()

    def cancel(self, request_id: str) -> None:
        self.dispatcher.cancel(request_id)

    # Intake: Kafka → look-ahead ----------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        lookahead = self.settings.scheduler_lookahead
        while not self._stopping.is_set():
            full = {p for p in PRIORITIES if self.scheduler.depth(p) >= lookahead or self.deferred.full(p)}
            assignment = self.consumer.assignment()
            hold = [tp for tp in assignment if self._priority_of.get(tp.topic) in full]
            if hold:
                self.consumer.pause(*hold)
            resume = [tp for tp in self.consumer.paused() if tp not in hold]
            if resume:
                self.consumer.resume(*resume)
            if len(full) == len(PRIORITIES) or (assignment and len(hold) == len(assignment)):
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.5)
                continue
            room = max(lookahead - self.scheduler.depth(p) for p in PRIORITIES if p not in full)
            try:
                batches = await self.consumer.getmany(timeout_ms=100, max_records=room)
            except KafkaError as exc:
                log.warning("fetching requests failed (will retry): %s", exc)
                await self._sleep(RETRY_S)
                continue
            # The assignment these records were fetched under. Taking a record awaits, and a rebalance may revoke and
            # assign a partition meanwhile: its position is then reset to the committed offset, and the rest of this
            # batch must not be taken under the new assignment (its tracker would commit past the records between).
            fetched_under = {tp: self.trackers.get(tp) for tp in batches}
            self._read_again_untracked(batches)
            for tp, records in batches.items():
                for record in records:
                    tracker = self.trackers.get(tp)
                    if tracker is None or tracker is not fetched_under[tp]:
                        break  # revoked meanwhile; whoever holds it now reads it again
                    tracker.take(record.offset)
                    await self._take(tp, record)
            if batches:
                self.core.changed.set()

    def _read_again_untracked(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        """Records of a partition assigned before its assignment callback made its tracker (the fetcher serves a new
        assignment at once): seek back so they are fetched again, and taken, once it has. Before any await, so the
        position sought is the one these records were returned at."""
        assignment = self.consumer.assignment()
        for tp, records in batches.items():
            if records and tp not in self.trackers and tp in assignment:
                log.info("%s[%d]@%d fetched before its assignment was made", tp.topic, tp.partition, records[0].offset)
                self.consumer.seek(tp, records[0].offset)

    async def _take(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], *, reread: bool = False) -> None:
        try:
            request = _checked(self.codec.decode_request(record.value))
        except (DecodeError, ValidationError) as exc:
            await self.dead_letter(record, exc)
            self._done(tp, record.offset)
            return
        with request_context(request.request_id):
            await self._queue(tp, record, request, reread)

    async def _queue(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], request: InferenceRequest, reread: bool
    ) -> None:
        rid = request.request_id
        created_ms = request.created_ms or request_id_time_ms(rid)
        # The topic, not the field, says the class: a plain producer picks one by where it writes.
        priority = self._priority_of.get(record.topic, INTERACTIVE)
        check_log = record.offset < self._assigned_end.get(tp, 0)
        if rid in self.core.cancelled:  # cancelled before it was read: it ends now, not in its turn
            self.dispatcher.end_cancelled(self._ticket(request, tp, record, created_ms, priority, check_log))
            return
        holding = self.scheduler.holding(priority, request.tenant)
        # Requests with a deadline stay in memory: the worker must be able to end them at their deadline.
        if not reread and request.deadline_ms is None and self.deferred.should_defer(priority, request.tenant, holding):
            self.deferred.add(priority, request.tenant, (tp, record.offset), created_ms)
            return
        ticket = self._ticket(request, tp, record, created_ms, priority, check_log)
        if not self.dispatcher.queue(ticket, arrival=not reread):
            waiting = self.scheduler.get(rid)
            first = waiting.item if waiting is not None else None
            if first is not None and first.lease is ticket.lease and first.source[1].offset == record.offset:
                return  # this very record, read again: the waiting ticket holds its offset
            log.info("request %s: read again while it waits; the later record is dropped", rid)
            self._done(tp, record.offset)

    def _ticket(
        self,
        request: InferenceRequest,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        created_ms: int,
        priority: str,
        check_log: bool,
    ) -> Ticket:
        ticket = Ticket(request, (tp, record), created_ms, priority, check_log, lease=self.trackers.get(tp))
        if tracing.enabled():  # the request's trace context, and when its record was appended (its queue wait's start)
            ticket.trace, ticket.appended_ms = tracing.record_trace(record.headers), record.timestamp
        return ticket

    async def _refill_loop(self) -> None:
        """Read deferred requests again once their tenant holds few enough in the look-ahead."""
        while not self._stopping.is_set():
            due = self.deferred.due(self.scheduler.holding)
            if not due:
                self._refill.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._refill.wait(), REFILL_PASS_S)
                continue
            for priority, tenant, count in due:
                left = await self._reread(self.deferred.take(priority, tenant, count))
                if left:
                    self.deferred.restore(priority, tenant, left)
                    await self._sleep(RETRY_S)
                    break
            self.core.changed.set()

    async def _reread(
        self, positions: list[Position[tuple[TopicPartition, int]]]
    ) -> list[Position[tuple[TopicPartition, int]]]:
        """Read these deferred requests again and queue them; returns those that could not be read now."""
        by_tp: dict[TopicPartition, dict[int, Position[tuple[TopicPartition, int]]]] = {}
        for position in positions:
            tp, offset = position.where
            if self._is_open(tp, offset):  # else revoked, or ended meanwhile
                by_tp.setdefault(tp, {})[offset] = position
        left: list[Position[tuple[TopicPartition, int]]] = []
        for tp, wanted in by_tp.items():
            try:
                async with self._history_lock:
                    await asyncio.wait_for(self._read_offsets(tp, wanted), PRIOR_TIMEOUT_S)
            except (KafkaError, TimeoutError) as exc:
                log.warning("reading deferred requests of %s[%d] failed (will retry): %s", tp.topic, tp.partition, exc)
            left += sorted(wanted.values(), key=lambda p: p.where[1])
        return left

    async def _read_offsets(self, tp: TopicPartition, wanted: dict[int, Position[tuple[TopicPartition, int]]]) -> None:
        """Queue the records at the ``wanted`` offsets of ``tp`` (taken out of ``wanted`` as they are read)."""
        self.history.assign([tp])
        self.history.seek(tp, min(wanted))
        last = max(wanted)
        while wanted:
            records = (await self.history.getmany(tp, timeout_ms=200, max_records=REREAD_BATCH)).get(tp, [])
            for record in records:
                if wanted.pop(record.offset, None) is not None and self._is_open(tp, record.offset):
                    await self._take(tp, record, reread=True)
            if (records and records[-1].offset >= last) or (not records and await self.history.position(tp) > last):
                for offset in list(wanted):  # gone from the log (retention): nothing left to run
                    log.warning("request at %s[%d]@%d is no longer in the log", tp.topic, tp.partition, offset)
                    del wanted[offset]
                    self._done(tp, offset)

    def _is_open(self, tp: TopicPartition, offset: int) -> bool:
        tracker = self.trackers.get(tp)
        return tracker is not None and offset in tracker.open

    def admitted(self) -> None:
        """Requests left the look-ahead: there is room to read more, and deferred ones may be due."""
        self._room.set()
        self._refill.set()

    def queue_samples(self) -> tuple[metrics.QueueSample, ...]:
        """The queue as last sampled by the commit loop (the metrics server reads it from its own thread)."""
        return self._samples

    def _sample(self) -> None:
        now = time.monotonic()
        if now - self._sampled < STATS_EVERY_S:
            return
        self._sampled = now
        rows: dict[tuple[str, str], tuple[int, int]] = {}
        for stat in self.scheduler.stats():
            rows[(stat.priority, stat.tenant)] = (stat.depth, stat.oldest_ms)
        for priority, tenant, count, oldest_ms in self.deferred.stats():
            depth, oldest = rows.get((priority, tenant), (0, oldest_ms))
            rows[(priority, tenant)] = (depth + count, min(oldest, oldest_ms))
        metrics.BATCH_SLOTS.labels(self.name).set(self.settings.max_batch_size)
        metrics.BATCH_SLOTS_USED.labels(self.name).set(len(self.core.ledger))
        kv = getattr(self.core.engine, "kv_cache_usage", None)  # engines that know their cache's fill
        if kv is not None:
            metrics.KV_CACHE_USAGE.labels(self.name).set(kv)
        samples = [metrics.QueueSample(self.name, p, t, d, o) for (p, t), (d, o) in rows.items()]
        for priority, topic in self.topics.items():
            unread = 0
            for tp, tracker in self.trackers.items():
                end = self.consumer.highwater(tp) if tp.topic == topic else None
                if end is not None and tracker.next_offset is not None:
                    unread += max(0, end - tracker.next_offset)
            samples.append(metrics.QueueSample(self.name, priority, None, unread, None))
        self._samples = tuple(samples)

    async def prior(self, ticket: Ticket) -> Prior | None:
        """What earlier runs left in the log; retried through broker outages."""
        rid = ticket.request.request_id
        while not self._stopping.is_set() and self.owns(ticket):
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
        if not self.owns(ticket) or self._stopping.is_set():
            return
        task = asyncio.create_task(self._retake_when_healthy(ticket), name=f"retake-{ticket.request.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retake_when_healthy(self, ticket: Ticket) -> None:
        await self.publisher.healthy.wait()
        if self.owns(ticket) and self.core.ledger.get(ticket.request.request_id) is None:
            ticket.check_log = True
            await self.dispatcher.admit_now(ticket)

    def owns(self, ticket: Ticket) -> bool:
        tp, record = ticket.source
        return owned(self.trackers.get(tp), ticket.lease, record.offset)

    async def dead_letter(self, record: ConsumerRecord[bytes, bytes], error: TokenRelayError) -> None:
        """Copy the record to the DLQ, waiting out a broken publisher."""
        while True:
            try:
                await dead_letter(self.publisher, self.settings, record, error)
                return
            except RunBroken:
                await self.publisher.healthy.wait()

    # Offsets -----------------------------------------------------------------------------------------------

    def _closed(self, ticket: Ticket) -> None:
        tp, record = ticket.source
        if owned(self.trackers.get(tp), ticket.lease, record.offset):
            self._done(tp, record.offset)

    def _done(self, tp: TopicPartition, offset: int) -> None:
        tracker = self.trackers.get(tp)
        if tracker is not None:
            tracker.done(offset)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self.commit()
            self._sample()

    async def commit(self) -> None:
        await self._commit(dict(self.trackers))

    async def _commit(self, trackers: dict[TopicPartition, OffsetTracker]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, tracker in trackers.items():
            position = tracker.committable()
            if position is not None and position != self._committed.get(tp):
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
        # The trackers go first, before any await: from here on no ticket of these partitions is this worker's, so an
        # admission that resumes during the awaits below cannot start a run that nothing would abandon (two workers
        # then ran one request to two ends).
        gone = {tp: self.trackers.pop(tp) for tp in revoked if tp in self.trackers}
        self.scheduler.remove(lambda waiting: waiting.item.source[0] not in revoked)
        self.deferred.forget(lambda where: where[0] not in revoked)
        self._room.set()
        self.core.abandon(lambda ticket: ticket.source[0] in revoked)
        await self.publisher.drain()
        await self._commit(gone)
        for tp in revoked:
            self._committed.pop(tp, None)

    async def assign(self, assigned: set[TopicPartition]) -> None:
        # The trackers first, before any await: the fetcher already serves the new assignment while this runs, and a
        # record it returns for a partition without a tracker would be passed over. Until the ends are known, every
        # record is checked against the log before it runs.
        for tp in assigned:
            self.trackers[tp] = OffsetTracker()
            self._assigned_end[tp] = UNKNOWN_END
        if assigned:
            try:
                self._assigned_end.update(await self.consumer.end_offsets(list(assigned)))
            except KafkaError as exc:
                log.warning("end offsets of %s unknown (%s)", sorted(tp.partition for tp in assigned), exc)
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
        for task in list(self._tasks):
            task.cancel()
        if len(self.core.ledger):
            log.info("model %s: shutting down, abandoning %d running requests", self.name, len(self.core.ledger))
            await self.revoke(set(self.trackers))
        await self.publisher.drain()
        await self.commit()

    async def close(self) -> None:
        metrics.QUEUES.remove(self.queue_samples)
        for gauge in (metrics.BATCH_SLOTS, metrics.BATCH_SLOTS_USED, metrics.KV_CACHE_USAGE):
            with contextlib.suppress(KeyError):
                gauge.remove(self.name)
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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _checked(request: InferenceRequest) -> InferenceRequest:
    if not is_request_id(request.request_id):
        raise ValidationError(f"request_id {request.request_id[:64]!r} is not a UUIDv7")
    return request

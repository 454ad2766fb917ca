"""Driving batches: each one by the gateway that owns its events partition, from validation to its output files."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable

from gateway.api.context import Gateway, error_body, produce_cancel
from gateway.batch.answers import LineRecord, LineResult, batch_record, line_record
from gateway.batch.lines import parse_lines
from gateway.batch.objects import (
    CANCELLED,
    CANCELLED_ERROR,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    EXPIRED_ERROR,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    TERMINAL,
    VALIDATING,
    BatchState,
    FileMeta,
    batch_uuid,
    error_file_id,
    error_line,
    jsonl,
    output_file_id,
    output_line,
)
from gateway.batch.store import BatchStore, produced_keys
from gateway.batch.tracker import Line, LineTracker
from schemas.errors import NotFound, TokenRelayError
from schemas.ids import CLOCK_SKEW_MS
from services.requests import submit_request
from services.settings import Settings

log = logging.getLogger(__name__)

SCAN_S = 0.5  # how often a gateway looks for batches it should drive
COUNTS_EVERY_S = 1.0  # how often a running batch's request_counts are written
CANCEL_CHUNK = 512
HANDOVER_S = 1.0  # how long a batch must have been ours before we take it over


def lines_topic(settings: Settings, model: str) -> str:
    """Where batch lines are produced: the batch class's topic, which workers fill free capacity from."""
    return settings.requests_topic_for(model, "batch")


def now_s() -> int:
    return int(time.time())


def now_ms() -> int:
    return int(time.time() * 1000)


class Drivers:
    """Starts a run for every unfinished batch whose events partition this gateway owns, and stops runs it lost.

    Ownership follows the gateways' consumer group on the events topic, so when a gateway dies its batches move to
    the gateway that takes its partitions over, which continues them from Kafka (the submit cursor and the log).
    """

    def __init__(self, gw: Gateway, store: BatchStore):
        self.gw = gw
        self.store = store
        self.runs: dict[str, asyncio.Task[None]] = {}
        self._owned_since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._scan(), name="batch-drivers")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self.runs.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _settled(self, batch_id: str, state: BatchState) -> bool:
        """Whether to start driving: a new batch at once; one taken over from another gateway once it has been ours
        for ``HANDOVER_S``, so that the last chunk its old driver had in flight is on its topic before we look."""
        since = self._owned_since.setdefault(batch_id, time.monotonic())
        return state.status == VALIDATING or time.monotonic() - since >= HANDOVER_S

    def ours(self, batch_id: str) -> bool:
        hub = self.gw.relay
        return hub.started.is_set() and hub.owns(hub.partition_of(batch_uuid(batch_id)))

    async def _scan(self) -> None:
        while True:
            changed = self.store.changed
            for batch_id, state in list(self.store.batches.items()):
                running = self.runs.get(batch_id)
                if running is not None and running.done():
                    del self.runs[batch_id]
                    running = None
                mine = state.status not in TERMINAL and self.ours(batch_id)
                if not mine:
                    self._owned_since.pop(batch_id, None)
                    if running is not None:
                        running.cancel()
                elif running is None and self._settled(batch_id, state):
                    copy = BatchState.from_json(state.to_json())
                    run = BatchRun(self.gw, self.store, copy, functools.partial(self.ours, batch_id))
                    self.runs[batch_id] = asyncio.create_task(run.run(), name=f"batch-{batch_id}")
            with contextlib.suppress(TimeoutError):  # a new batch starts at once, moved ones within SCAN_S
                await asyncio.wait_for(changed.wait(), SCAN_S)


class Moved(Exception):
    """The batch's events partition moved to another gateway, which drives the batch from now on."""


class BatchRun:
    """One batch, driven by one gateway: validate, submit (resumable, no line twice), follow, finalize."""

    def __init__(self, gw: Gateway, store: BatchStore, state: BatchState, owned: Callable[[], bool] = lambda: True):
        self.gw = gw
        self.owned = owned  # whether this gateway still drives the batch (its events partition moves on rebalance)
        self.settings = gw.settings
        self.store = store
        self.state = state
        self.lines: list[Line] = []

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Moved:
            log.info("batch %s moved to another gateway", self.state.id)
        except Exception:
            # Another scan starts it again from what Kafka holds.
            log.exception("batch %s: its run stopped; it will be taken up again", self.state.id)
            await asyncio.sleep(SCAN_S)

    async def _run(self) -> None:
        await self.store.sync()  # the batch as last written, not as this gateway's copy had it when the run began
        latest = self.store.batches.get(self.state.id)
        if latest is None or latest.status in TERMINAL:
            return
        self.state = state = BatchState.from_json(latest.to_json())
        if not await self._read_lines():
            return
        partitions = self.gw.relay.source.partitions
        tracker = LineTracker(self.settings, self.gw.codec, self.lines, state.created_ms, partitions)
        await tracker.start()
        try:
            if state.status in (IN_PROGRESS, FINALIZING):
                await self._submit()
            await self._watch(tracker)
        finally:
            await tracker.stop()

    # --- validating ------------------------------------------------------------------------------------------------

    async def _read_lines(self) -> bool:
        """The batch's lines from its input file; a batch still validating fails here with its lines' errors."""
        state = self.state
        try:
            data = await self.store.read_content(state.input_file())
        except NotFound as exc:  # retention deleted it: only for a batch older than its window and the margin
            await self._fail([{"code": "invalid_file", "message": exc.message}])
            return False
        validating = state.status == VALIDATING

        def check(url: str, body: dict[str, object]) -> object:
            return line_record(self.gw, url, body, state.tenant) if validating else None

        parsed, errors = await asyncio.to_thread(
            parse_lines, data, self.settings.batch_max_lines, check, state.endpoint
        )
        if validating and (errors or not parsed):
            problems = [e.as_openai() for e in errors] or [{"code": "empty_file", "message": "the file has no lines"}]
            await self._fail(problems)
            return False
        for item in parsed:
            record: LineRecord | None = None
            result: LineResult | None = None
            try:
                made = line_record(self.gw, item.url, item.body, state.tenant)
                record = batch_record(made, state.id, item.line, state.created_ms, item.custom_id)
            except TokenRelayError as exc:  # taken over after its model went away, say: the line fails, not the batch
                result = LineResult(exc.http_status, {"error": error_body(exc)})
            self.lines.append(Line(item.line, item.custom_id, item.url, record, result))
        if validating:
            state.status, state.in_progress_at = IN_PROGRESS, now_s()
            state.total = len(self.lines)
            first = self.lines[0].record
            state.model = first.request.model if first is not None else None
            await self.store.put_batch(state)
        return True

    async def _fail(self, errors: list[dict[str, object]]) -> None:
        state = self.state
        state.status, state.failed_at, state.errors = FAILED, now_s(), errors
        await self.store.put_batch(state)
        log.info("batch %s failed validation: %d errors", state.id, len(errors))

    # --- submitting ------------------------------------------------------------------------------------------------

    async def _submit(self) -> None:
        """Produce lines from the cursor on, a chunk at a time, writing the cursor after each acknowledged chunk.

        The chunk after the cursor may have been produced by a driver that died before it wrote the cursor: its lines
        are looked for on their topics first (their ids are deterministic), so none is produced twice.
        """
        state, chunk = self.state, max(1, self.settings.batch_submit_chunk)
        start = state.submitted
        if start >= len(self.lines):
            return
        doubt = [line for line in self.lines[start : start + chunk] if line.record is not None]
        topics = {lines_topic(self.settings, line.record.request.model) for line in doubt if line.record is not None}
        since = (state.submitted_ms or state.created_ms) - CLOCK_SKEW_MS
        present = await produced_keys(self.settings, topics, {line.request_id.encode() for line in doubt}, since)
        if present:
            log.info("batch %s: %d lines after the cursor were already submitted", state.id, len(present))
        while start < len(self.lines):
            if self._cancel_asked() or now_s() >= state.expires_at:
                return
            if not self.owned():  # another gateway takes over from the cursor: not one more chunk from here
                raise Moved(state.id)
            part = [
                line
                for line in self.lines[start : start + chunk]
                if line.record is not None and line.request_id.encode() not in present
            ]
            sent = await asyncio.gather(
                *(self._produce(line.record) for line in part if line.record is not None), return_exceptions=True
            )
            # Every send has ended before anything is raised: none may land after a later run looked for it.
            if failed := next((r for r in sent if isinstance(r, BaseException)), None):
                raise failed
            start = min(start + chunk, len(self.lines))
            state.submitted, state.submitted_ms = start, now_ms()
            await self.store.put_batch(state)
        log.info("batch %s: all %d lines submitted", state.id, len(self.lines))

    async def _produce(self, record: LineRecord) -> None:
        request = record.request
        await submit_request(
            self.gw.producer,
            self.settings,
            self.gw.codec,
            request,
            record.accepted,
            topic=lines_topic(self.settings, request.model),
        )

    # --- following and finishing -----------------------------------------------------------------------------------

    def _cancel_asked(self) -> bool:
        return self.state.id in self.store.cancels or self.state.status == CANCELLING

    async def _watch(self, tracker: LineTracker) -> None:
        state = self.state
        written = (state.completed, state.failed)
        last_write = 0.0
        while True:
            if tracker.ended >= len(self.lines):
                await self._finish(COMPLETED)
                return
            if self._cancel_asked():
                await self._cancel(tracker)
                return
            if now_s() >= state.expires_at:
                await self._cancel_unfinished()
                await self._finish(EXPIRED)
                return
            if not self.owned():
                raise Moved(state.id)
            self._count()
            if (state.completed, state.failed) != written and time.monotonic() - last_write >= COUNTS_EVERY_S:
                await self.store.put_batch(state)
                written, last_write = (state.completed, state.failed), time.monotonic()
            tracker.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracker.changed.wait(), COUNTS_EVERY_S)

    def _count(self) -> None:
        state = self.state
        results = [line.result for line in self.lines if line.result is not None and not line.result.cancelled]
        state.completed = sum(1 for r in results if r.status_code < 300)
        state.failed = len(results) - state.completed
        state.usage = {
            "input_tokens": sum(r.prompt_tokens for r in results),
            "output_tokens": sum(r.completion_tokens for r in results),
        }

    async def _cancel(self, tracker: LineTracker) -> None:
        state = self.state
        if state.status != CANCELLING:
            state.status, state.cancelling_at = CANCELLING, self.store.cancels.get(state.id, now_s())
            await self.store.put_batch(state)
        await self._cancel_unfinished()
        deadline = time.monotonic() + self.settings.batch_cancel_wait_s
        while tracker.ended < self._submitted_count() and (left := deadline - time.monotonic()) > 0:
            tracker.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracker.changed.wait(), min(left, COUNTS_EVERY_S))
        await self._finish(CANCELLED)

    def _submitted_count(self) -> int:
        """Lines that will end without another submit: those before the cursor, and those that made no record."""
        return sum(1 for i, line in enumerate(self.lines) if line.record is None or i < self.state.submitted)

    async def _cancel_unfinished(self) -> None:
        """Cancel every submitted line that has not ended (a worker stops it within a decode step)."""
        pending = [
            line for line in self.lines[: self.state.submitted] if line.record is not None and line.result is None
        ]
        for i in range(0, len(pending), CANCEL_CHUNK):
            part = pending[i : i + CANCEL_CHUNK]
            await asyncio.gather(*(produce_cancel(self.gw, line.request_id, "batch_cancelled") for line in part))

    async def _finish(self, status: str) -> None:
        """Write the output and error files from the lines' results, then the batch's final status."""
        state = self.state
        if status == COMPLETED and state.status != FINALIZING:
            state.status, state.finalizing_at = FINALIZING, now_s()
            await self.store.put_batch(state)
        self._count()
        code, message = EXPIRED_ERROR if status == EXPIRED else CANCELLED_ERROR
        out, errors = [], []
        for line in self.lines:
            request_id = line.request_id if line.record is not None else ""
            result = line.result
            if result is None or result.cancelled:
                errors.append(error_line(request_id, line.custom_id, code, message))
            elif result.status_code < 300:
                out.append(output_line(request_id, line.custom_id, result.status_code, result.body))
            else:
                errors.append(output_line(request_id, line.custom_id, result.status_code, result.body))
        if out:
            state.output_file_id = await self._save(output_file_id(state.id), "output", jsonl(out))
        if errors:
            state.error_file_id = await self._save(error_file_id(state.id), "errors", jsonl(errors))
        state.completed, state.failed = len(out), len(errors)
        state.status = status
        at = now_s()
        if status == COMPLETED:
            state.completed_at = at
        elif status == CANCELLED:
            state.cancelled_at = at
        else:
            state.expired_at = at
        await self.store.put_batch(state)
        log.info("batch %s %s: %d lines in the output, %d in the error file", state.id, status, len(out), len(errors))

    async def _save(self, file_id: str, kind: str, data: bytes) -> str:
        created = now_s()
        expires = created + self.settings.files_retention_ms // 1000
        meta = FileMeta(
            file_id, self.state.tenant, f"{self.state.id}_{kind}.jsonl", "batch_output", 0, created, expires
        )
        await self.store.save_file(meta, data)
        return file_id

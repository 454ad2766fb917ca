"""What earlier runs of a request left in the events log: finished, or tokens to continue from."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import Codec, default_codec
from schemas.errors import DecodeError, UnknownSchemaId
from schemas.ids import CLOCK_SKEW_MS
from schemas.partitioning import partition_for_key
from schemas.records import TokenEvent
from schemas.runlog import RunLog
from services import tracing
from services.kafka import read_key
from services.tracing import NO_TRACE, TraceHeaders

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Prior:
    """The log's view of a request: ``terminal`` when done; else the run to continue and its tokens (may be none).

    ``stalled_runs`` counts the runs in a row, up to the last, that stopped without a new token: a request that
    keeps killing its worker before its first token shows up here.
    """

    terminal: bool = False
    run_id: str | None = None
    token_ids: tuple[int, ...] = ()
    text: str = ""
    stalled_runs: int = 0
    trace: TraceHeaders = NO_TRACE  # the trace context the request's events carry (read only while tracing is on)


def summarize(request_id: str, events: Sequence[TokenEvent]) -> Prior:
    """Fold a request's events (log order) into what a new run must know, by the rules of ``RunLog``."""
    fold = RunLog(request_id, keep_ids=True)
    for event in events:
        fold.feed(event)
    if fold.terminal is not None:
        return Prior(terminal=True)
    run = fold.current
    if run is None:
        return Prior()
    # Continued even with no tokens yet: the new run names its predecessor, so a client sees no restart.
    return Prior(run_id=run.run_id, token_ids=tuple(run.token_ids or ()), text=run.text, stalled_runs=fold.stalled_runs)


async def read_prior(
    consumer: AIOKafkaConsumer,
    topic: str,
    partitions: int,
    request_id: str,
    since_ms: int,
    codec: Codec | None = None,
) -> Prior:
    """Read the request's events from its partition (from ``since_ms`` less the clock skew to the high-water mark)."""
    tp = TopicPartition(topic, partition_for_key(request_id, partitions))
    consumer.assign([tp])
    end = (await consumer.end_offsets([tp]))[tp]
    codec = codec or default_codec()
    events: list[TokenEvent] = []
    trace = NO_TRACE
    async for record in read_key(consumer, tp, request_id.encode(), since_ms - CLOCK_SKEW_MS, end):
        if not trace and tracing.enabled():
            trace = tracing.record_trace(record.headers)
        try:
            events.append(codec.decode_event(record.value or b""))
        except DecodeError as exc:
            if not isinstance(exc, UnknownSchemaId):
                log.warning("request %s: undecodable event at offset %d: %s", request_id, record.offset, exc)
    prior = summarize(request_id, events)
    return dataclasses.replace(prior, trace=trace) if trace else prior

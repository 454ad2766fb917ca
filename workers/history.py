"""What earlier runs of a request left in the events log: finished, or tokens to continue from."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import default_codec
from schemas.errors import DecodeError
from schemas.records import TokenEvent
from schemas.runlog import RunLog
from services.kafka import partition_for_key

log = logging.getLogger(__name__)

LOOKBACK_MS = 5_000


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


async def read_prior(consumer: AIOKafkaConsumer, topic: str, partitions: int, request_id: str, since_ms: int) -> Prior:
    """Read the request's events from its partition (from ``since_ms`` minus a margin to the high-water mark)."""
    tp = TopicPartition(topic, partition_for_key(request_id, partitions))
    consumer.assign([tp])
    end = (await consumer.end_offsets([tp]))[tp]
    found = (await consumer.offsets_for_times({tp: max(0, since_ms - LOOKBACK_MS)}))[tp]
    start = found.offset if found is not None else end
    if start >= end:
        return Prior()
    consumer.seek(tp, start)
    codec = default_codec()
    key = request_id.encode()
    events: list[TokenEvent] = []
    position = start
    while position < end:
        batches = await consumer.getmany(tp, timeout_ms=1000)
        for record in batches.get(tp, []):
            position = record.offset + 1
            if record.key != key or record.offset >= end:
                continue
            try:
                events.append(codec.decode_event(record.value))
            except DecodeError as exc:
                log.warning("request %s: undecodable event at offset %d: %s", request_id, record.offset, exc)
        if not batches:
            position = max(position, await consumer.position(tp))
    return summarize(request_id, events)

"""`tokenrelay trace <request_id>`: one request's timeline read from the Kafka log alone (no tracing backend)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import Codec
from schemas.errors import ConfigError, DecodeError
from schemas.ids import is_request_id, request_id_time_ms
from schemas.partitioning import partition_for_key
from schemas.records import PRIORITIES, Accepted, Started, TokenEvent
from schemas.runlog import RunLog
from services.cli.logtools import POLL_MS, REQUEST_START_SLACK_MS, assign_events, events_partition_count, offsets_at
from services.cli.timeline import Position, Timeline, build_timeline, render_table
from services.kafka import make_consumer, start_client
from services.schema_registry import reading_codec
from services.settings import Settings
from services.topics import describe_topics

# How long after its id was made a request's record is looked for on its requests topic (a producer makes the id
# just before it sends the record; the slack covers clock skew).
_QUEUED_WINDOW_MS = 5 * 60_000


async def trace(settings: Settings, request_id: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the timeline of ``request_id``; exit code 1 when the log holds nothing of it."""
    check_request_id(request_id)
    timeline = await read_timeline(settings, request_id)
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(timeline.to_json(), ensure_ascii=False, indent=2) + "\n")
    else:
        out.write(render_table(timeline) + "\n")
    return 1 if timeline.status == "unknown" else 0


def check_request_id(request_id: str) -> None:
    if not is_request_id(request_id):
        raise ConfigError(f"{request_id!r} is not a request id (UUIDv7)")


async def read_timeline(settings: Settings, request_id: str) -> Timeline:
    codec = reading_codec(settings)
    events = await _read_events(settings, codec, request_id)
    model, priorities = _where_queued(settings, events)
    queued = await _find_request_record(settings, request_id, model, priorities) if model else None
    return build_timeline(request_id, events, queued, id_time_ms=request_id_time_ms(request_id))


async def _read_events(settings: Settings, codec: Codec, request_id: str) -> list[tuple[Position, TokenEvent]]:
    """The request's events, from its events partition, up to its terminal event or the end of the log."""
    partition = partition_for_key(request_id, await events_partition_count(settings))
    consumer, tps = await assign_events(settings, [partition])
    found: list[tuple[Position, TokenEvent]] = []
    fold = RunLog(request_id)
    key = request_id.encode()
    try:
        starts = await offsets_at(consumer, tps, request_id_time_ms(request_id) - REQUEST_START_SLACK_MS)
        stops = await consumer.end_offsets(tps)
        (tp,) = tps
        consumer.seek(tp, starts[tp])
        while await consumer.position(tp) < stops[tp] and fold.terminal is None:
            for record in (await consumer.getmany(tp, timeout_ms=POLL_MS)).get(tp, []):
                if record.offset >= stops[tp] or record.key != key:
                    continue
                try:
                    event = codec.decode_event(record.value or b"")
                except DecodeError:
                    continue
                found.append((Position(tp.topic, tp.partition, record.offset, record.timestamp), event))
                fold.feed(event)
    finally:
        await consumer.stop()
    return found


def _where_queued(settings: Settings, events: list[tuple[Position, TokenEvent]]) -> tuple[str, tuple[str, ...]]:
    """The model whose requests topic holds the record, and the classes (topics) to look in."""
    for _, ev in events:
        if isinstance(ev.payload, Accepted):
            return ev.payload.model, (ev.payload.priority,)
    for _, ev in events:
        if isinstance(ev.payload, Started):
            return ev.payload.model, PRIORITIES  # produced straight to Kafka: either class's topic
    return "", ()


async def _find_request_record(
    settings: Settings, request_id: str, model: str, priorities: tuple[str, ...]
) -> Position | None:
    """Where the request's record was appended on its model's requests topic (interactive or batch)."""
    topics = [settings.requests_topic_for(model, p) for p in priorities]
    counts = await describe_topics(settings, topics)
    consumer = make_consumer(settings, client_id="tokenrelay-trace")
    await start_client(consumer)
    try:
        for topic in topics:
            if counts.get(topic):
                tp = TopicPartition(topic, partition_for_key(request_id, counts[topic]))
                found = await _scan_for_key(consumer, tp, request_id)
                if found is not None:
                    return found
    finally:
        await consumer.stop()
    return None


async def _scan_for_key(consumer: AIOKafkaConsumer, tp: TopicPartition, request_id: str) -> Position | None:
    consumer.assign([tp])
    made_ms = request_id_time_ms(request_id)
    start = (await offsets_at(consumer, [tp], made_ms - REQUEST_START_SLACK_MS))[tp]
    stop = (await consumer.end_offsets([tp]))[tp]
    consumer.seek(tp, start)
    key = request_id.encode()
    while await consumer.position(tp) < stop:
        for record in (await consumer.getmany(tp, timeout_ms=POLL_MS)).get(tp, []):
            if record.key == key and record.offset < stop:
                return Position(tp.topic, tp.partition, record.offset, record.timestamp)
            if record.timestamp > made_ms + _QUEUED_WINDOW_MS:
                return None
    return None

"""Token-log tools for analytics consumers: `tokenrelay tail` and `tokenrelay export`."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, assert_never

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas.codec import Codec, default_codec
from schemas.errors import ConfigError, DecodeError, KafkaUnavailable
from schemas.ids import is_request_id, request_id_time_ms
from schemas.partitioning import partition_for_key
from schemas.records import Accepted, Deleted, Delta, Failed, Finished, Started, TokenEvent
from services.kafka import make_consumer, start_client
from services.schema_registry import reading_codec
from services.settings import Settings
from services.topics import describe_topics

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
# A request's events start a little after its id was made; the slack covers clock skew between producer and broker.
REQUEST_START_SLACK_MS = 60_000
POLL_MS = 500


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Unix ms from ``10m``/``2h``/``30s``/``1d`` (that long ago), ``now``, epoch ms, or ISO 8601.

    An ISO time without a zone is local time.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    value = text.strip()
    if not value:
        raise ConfigError("empty time")
    if value.lower() == "now":
        return now
    match = _DURATION.match(value)
    if match:
        return now - int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    if value.isdigit() and len(value) >= 12:
        return int(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a time: use e.g. 10m, 2h, 1d or 2024-05-01T12:00:00Z") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()
    return int(parsed.timestamp() * 1000)


def event_json(event: TokenEvent) -> dict[str, Any]:
    """A decoded event as plain JSON: the envelope fields, the payload's type and the payload."""
    return {
        "request_id": event.request_id,
        "run_id": event.run_id,
        "seq": event.seq,
        "ts_ms": event.ts_ms,
        "type": type(event.payload).__name__,
        "payload": dataclasses.asdict(event.payload, dict_factory=_plain),
    }


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dataclass's fields as JSON takes them: bytes (a logprob's token bytes) as a list of ints, as OpenAI's."""
    return {k: list(v) if isinstance(v, bytes) else v for k, v in items}


def export_line(record: ConsumerRecord[bytes, bytes], codec: Codec | None = None) -> dict[str, Any]:
    """One JSON Lines object for a Kafka record; an undecodable value gives an ``error`` field, not an exception."""
    line: dict[str, Any] = {
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
    }
    try:
        line["event"] = event_json((codec or default_codec()).decode_event(record.value or b""))
    except DecodeError as exc:
        line["error"] = exc.message
        line["value_b64"] = base64.b64encode(record.value or b"").decode("ascii")
    return line


def tail_line(record: ConsumerRecord[bytes, bytes], codec: Codec | None = None) -> str:
    """One human line for a Kafka record of the events topic."""
    when = datetime.fromtimestamp(record.timestamp / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    where = f"{when} p{record.partition}@{record.offset}"
    try:
        event = (codec or default_codec()).decode_event(record.value or b"")
    except DecodeError as exc:
        return f"{where} undecodable: {exc.message}"
    p = event.payload
    head = f"{where} {event.request_id} run={event.run_id[:8]} seq={event.seq}"
    match p:
        case Accepted():
            tenant = f" tenant={p.tenant}" if p.tenant else ""
            deadline = f" deadline_ms={p.deadline_ms}" if p.deadline_ms is not None else ""
            background = " background" if p.background else ""
            return f"{head} accepted model={p.model}{tenant}{deadline}{background}"
        case Started():
            tenant = f" tenant={p.tenant}" if p.tenant else ""
            return f"{head} started model={p.model} worker={p.worker} prompt_tokens={p.prompt_tokens}{tenant}"
        case Delta():
            return f"{head} token {json.dumps(p.text, ensure_ascii=False)} {list(p.token_ids)}"
        case Finished():
            return (
                f"{head} done {p.finish_reason} prompt_tokens={p.usage.prompt_tokens} "
                f"completion_tokens={p.usage.completion_tokens} ttft_ms={p.ttft_ms} total_ms={p.total_ms}"
            )
        case Failed():
            return f"{head} failed {p.code}: {p.message}{' (retriable)' if p.retriable else ''}"
        case Deleted():
            return f"{head} deleted{f' tenant={p.tenant}' if p.tenant else ''}"
        case _:
            assert_never(p)


async def assign_events(
    settings: Settings, only: Iterable[int] | None = None
) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    count = (await describe_topics(settings)).get(settings.events_topic, 0)
    if not count:
        raise KafkaUnavailable(f"topic {settings.events_topic} does not exist", retriable=False)
    partitions = set(range(count))
    consumer = make_consumer(settings, client_id="tokenrelay-logtools")
    await start_client(consumer)
    wanted = set(only) if only is not None else partitions
    tps = [TopicPartition(settings.events_topic, p) for p in sorted(partitions & wanted)]
    consumer.assign(tps)
    return consumer, tps


async def offsets_at(consumer: AIOKafkaConsumer, tps: list[TopicPartition], ts_ms: int) -> dict[TopicPartition, int]:
    """First offset at or after ``ts_ms`` per partition; the end offset where no record is that new."""
    found = await consumer.offsets_for_times(dict.fromkeys(tps, ts_ms))
    ends = await consumer.end_offsets(tps)
    return {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}


EXPORT_FORMATS = ("jsonl", "parquet")
# Columns of the Parquet export: the Kafka position, the envelope and the payload flattened for SQL.
PARQUET_COLUMNS = (
    "partition", "offset", "timestamp", "key", "request_id", "run_id", "seq", "ts_ms", "type",
    "text", "token_count", "worker", "model", "finish_reason", "prompt_tokens", "completion_tokens",
    "ttft_ms", "total_ms", "error_code", "payload_json", "undecodable",
)  # fmt: skip


def parquet_row(line: dict[str, Any]) -> dict[str, Any]:
    """One export line (see ``export_line``) as a flat row of PARQUET_COLUMNS; absent values are None."""
    row: dict[str, Any] = dict.fromkeys(PARQUET_COLUMNS)
    row.update(partition=line["partition"], offset=line["offset"], timestamp=line["timestamp"], key=line["key"])
    event = line.get("event")
    if event is None:
        row["undecodable"] = line.get("error", "")
        return row
    payload = event["payload"]
    row.update({k: event[k] for k in ("request_id", "run_id", "seq", "ts_ms", "type")})
    row["payload_json"] = json.dumps(payload, ensure_ascii=False)
    row.update(PAYLOAD_COLUMNS[event["type"]](payload))
    return row


def _finished_columns(payload: dict[str, Any]) -> dict[str, Any]:
    usage = payload["usage"]
    return {
        "finish_reason": payload["finish_reason"],
        "ttft_ms": payload["ttft_ms"],
        "total_ms": payload["total_ms"],
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }


# The columns each payload type fills, by its name (a unit test keeps the keys equal to schemas.records' payloads).
PAYLOAD_COLUMNS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "Accepted": lambda p: {"model": p["model"]},
    "Started": lambda p: {"worker": p["worker"], "model": p["model"], "prompt_tokens": p["prompt_tokens"]},
    "Delta": lambda p: {"text": p["text"], "token_count": len(p["token_ids"])},
    "Finished": _finished_columns,
    "Failed": lambda p: {"error_code": p["code"]},
    "Deleted": lambda p: {},
}


class _JsonlSink:
    def __init__(self, out: str | None):
        self._out = out
        self._stream: IO[str] = Path(out).open("w", encoding="utf-8") if out else sys.stdout  # noqa: SIM115 - closed in close()

    def write(self, line: dict[str, Any]) -> None:
        self._stream.write(json.dumps(line, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._stream.flush()
        if self._out:
            self._stream.close()


class _ParquetSink:
    """Rows buffered and written as row groups of a Parquet file (pyarrow)."""

    ROW_GROUP = 50_000

    def __init__(self, out: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        text, i64, i32 = pa.string(), pa.int64(), pa.int32()
        types = {"partition": i32, "offset": i64, "timestamp": pa.timestamp("ms", tz="UTC"), "seq": i64}
        types |= {"ts_ms": i64, "token_count": i32, "prompt_tokens": i32, "completion_tokens": i32}
        types |= {"ttft_ms": i64, "total_ms": i64}
        self._schema = pa.schema([(name, types.get(name, text)) for name in PARQUET_COLUMNS])
        self._writer = pq.ParquetWriter(out, self._schema, compression="zstd")
        self._rows: list[dict[str, Any]] = []

    def write(self, line: dict[str, Any]) -> None:
        self._rows.append(parquet_row(line))
        if len(self._rows) >= self.ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


async def export(
    settings: Settings, *, since: str, until: str | None = None, out: str | None = None, fmt: str = "jsonl"
) -> int:
    """Write every event of [since, until) as JSON Lines or Parquet; stops at the end of the range."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "parquet" and not out:
        raise ConfigError("--format parquet needs --out FILE")
    start_ms = parse_time(since)
    end_ms = parse_time(until) if until else int(time.time() * 1000)
    if end_ms < start_ms:
        raise ConfigError("--until is before --since")
    codec = reading_codec(settings)
    consumer, tps = await assign_events(settings)
    sink: _JsonlSink | _ParquetSink = _ParquetSink(out) if fmt == "parquet" and out else _JsonlSink(out)
    count = 0
    try:
        starts = await offsets_at(consumer, tps, start_ms)
        stops = await offsets_at(consumer, tps, end_ms)
        pending = {tp for tp in tps if starts[tp] < stops[tp]}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        if len(pending) < len(tps):
            consumer.pause(*[tp for tp in tps if tp not in pending])
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=POLL_MS)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= stops[tp]:
                        break
                    sink.write(export_line(record, codec))
                    count += 1
                if await consumer.position(tp) >= stops[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
    finally:
        await consumer.stop()
        sink.close()
    log.info("exported %d events", count)
    if out:
        print(f"exported {count} events to {out}", file=sys.stderr)
    return 0


async def tail(
    settings: Settings, *, request_id: str | None = None, since: str | None = None, follow: bool = True
) -> int:
    """Print one line per event: all partitions, or the one partition of ``request_id`` filtered to that request."""
    since_ms = parse_time(since) if since is not None else None  # a bad time is an error before any I/O
    only = None
    if request_id is not None:
        if not is_request_id(request_id):
            raise ConfigError(f"{request_id!r} is not a request id (UUIDv7)")
        only = [partition_for_key(request_id, await events_partition_count(settings))]
    codec = reading_codec(settings)
    consumer, tps = await assign_events(settings, only)
    try:
        if since_ms is not None:
            starts = await offsets_at(consumer, tps, since_ms)
        elif request_id is not None:
            starts = await offsets_at(consumer, tps, request_id_time_ms(request_id) - REQUEST_START_SLACK_MS)
        elif follow:
            starts = await consumer.end_offsets(tps)
        else:
            starts = await consumer.beginning_offsets(tps)
        stops = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        while True:
            batches = await consumer.getmany(*tps, timeout_ms=POLL_MS)
            for records in batches.values():
                for record in records:
                    if request_id is not None and (record.key or b"").decode("utf-8", "replace") != request_id:
                        continue
                    print(tail_line(record, codec), flush=True)
                    if request_id is not None and _ends_request(record, codec):
                        return 0
            if not follow and all([await consumer.position(tp) >= stops[tp] for tp in tps]):
                return 0
    finally:
        await consumer.stop()


async def events_partition_count(settings: Settings) -> int:
    return (await describe_topics(settings)).get(settings.events_topic, 0) or settings.events_partitions


def _ends_request(record: ConsumerRecord[bytes, bytes], codec: Codec) -> bool:
    try:
        event = codec.decode_event(record.value or b"")
    except DecodeError:
        return False
    p = event.payload
    match p:
        case Finished():
            return True
        case Failed():
            return not p.retriable
        case Accepted() | Started() | Delta() | Deleted():
            return False
        case _:
            assert_never(p)

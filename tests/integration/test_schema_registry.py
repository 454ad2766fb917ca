"""The token log read and written by clients tokenrelay does not implement, through a real schema registry."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import ControlEvent, InferenceRequest
from services.cli.logtools import export
from services.kafka import record_headers, start_client
from services.schema_registry import prepare_codec
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.worker_helpers import worker_process
from tests.isolation import in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# quixstreams pins confluent-kafka<2.13, so it lives in a venv of its own (`make quix-venv`).
QUIX_PYTHON = Path(
    os.environ.get("TOKENRELAY_TEST_QUIX_PYTHON") or Settings().cache_dir / "quix-venv" / "bin" / "python"
)
QUIX_APP = Path(__file__).with_name("quix_app.py")

# A backend producer's own copy of the request schema: the three fields it needs, nothing of tokenrelay's code.
MINIMAL_REQUEST_SCHEMA = """{
  "type": "record", "name": "InferenceRequest", "namespace": "io.tokenrelay",
  "fields": [
    {"name": "request_id", "type": "string"},
    {"name": "prompt", "type": "string"},
    {"name": "max_tokens", "type": "int"}
  ]
}"""
MAX_TOKENS = 8
REGISTRY_TIMEOUT_S = 10  # confluent-kafka's registry client waits without end by default


def _settings(kafka_bootstrap: str, topic_prefix: str, registry: str) -> Settings:
    return Settings.from_env(
        {},
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        schema_registry_url=registry,
        engine="synthetic",
        synthetic_tokens_per_s=40.0,
        requests_partitions=2,
        events_partitions=2,
        worker_metrics_port=0,
    )


def _payload_type(payload: dict[str, Any]) -> str:
    # confluent-kafka's deserializer gives union branches as plain dicts: tell them apart by their fields.
    for name, field in (("Finished", "finish_reason"), ("Delta", "token_ids"), ("Started", "worker")):
        if field in payload:
            return name
    return "Failed" if "code" in payload else "Accepted"


class RegistryOnlyReader:
    """confluent-kafka's Consumer and AvroDeserializer, configured with nothing but the broker and registry URL.

    Each read runs in a thread of its own (confluent-kafka blocks) with a consumer of its own, made, polled and
    closed in that thread: with a deadline, and ending soon after its test is cancelled (``in_thread``).
    """

    def __init__(self, bootstrap: str, registry: str):
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer

        self.bootstrap = bootstrap
        self.registry = SchemaRegistryClient({"url": registry, "timeout": REGISTRY_TIMEOUT_S})
        self.deserialize = AvroDeserializer(self.registry)

    async def read_topic(self, topic: str, partitions: int, timeout_s: float = 60.0) -> list[tuple[bytes, Any]]:
        """Every (raw value, decoded value) of ``topic`` from the beginning to its current end."""
        return await in_thread(lambda stop: self._read_topic(stop, topic, partitions, timeout_s))

    async def events_until(
        self, topic: str, partitions: int, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 90.0
    ) -> list[Any]:
        """Decoded events of ``topic`` from the beginning, polled until ``done(events)``."""
        return await in_thread(lambda stop: self._events_until(stop, topic, partitions, done, timeout_s))

    def _consumer(self, topic: str, partitions: int) -> Any:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": f"reader-{new_request_id()}", "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        return consumer

    def _read_topic(
        self, stop: threading.Event, topic: str, partitions: int, timeout_s: float
    ) -> list[tuple[bytes, Any]]:
        from confluent_kafka import TopicPartition
        from confluent_kafka.serialization import MessageField, SerializationContext

        consumer = self._consumer(topic, partitions)
        try:
            watermarks = consumer.get_watermark_offsets
            ends = {p: watermarks(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
            out: list[tuple[bytes, Any]] = []
            seen = dict.fromkeys(ends, 0)
            deadline = time.monotonic() + timeout_s
            while any(seen[p] < ends[p] for p in ends) and not stop.is_set():
                assert time.monotonic() < deadline, f"{topic}: read {seen} of {ends} in {timeout_s} s"
                message = consumer.poll(0.5)
                if message is None or message.error() is not None:
                    continue
                partition, offset, raw = message.partition(), message.offset(), message.value()
                assert partition is not None and offset is not None and raw is not None
                seen[partition] = offset + 1
                out.append((raw, self.deserialize(raw, SerializationContext(topic, MessageField.VALUE))))
            return out
        finally:
            consumer.close()

    def _events_until(
        self,
        stop: threading.Event,
        topic: str,
        partitions: int,
        done: Callable[[list[dict[str, Any]]], bool],
        timeout_s: float,
    ) -> list[Any]:
        from confluent_kafka.serialization import MessageField, SerializationContext

        consumer = self._consumer(topic, partitions)
        try:
            events: list[dict[str, Any]] = []
            deadline = time.monotonic() + timeout_s
            while not done(events) and not stop.is_set():
                assert time.monotonic() < deadline, f"{len(events)} events of {topic} in {timeout_s} s"
                message = consumer.poll(0.5)
                if message is None or message.error() is not None:
                    continue
                events.append(self.deserialize(message.value(), SerializationContext(topic, MessageField.VALUE)))
            return events
        finally:
            consumer.close()

    def close(self) -> None:
        self.registry.close()


def _serializer_producer(stop: threading.Event, settings: Settings, registry: str, request_ids: list[str]) -> None:
    """A backend service: confluent-kafka's Producer and AvroSerializer, straight onto the requests topic."""
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    with SchemaRegistryClient({"url": registry, "timeout": REGISTRY_TIMEOUT_S}) as client:
        serialize = AvroSerializer(client, MINIMAL_REQUEST_SCHEMA)
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
        for rid in request_ids:
            if stop.is_set():
                return
            value = {"request_id": rid, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS}
            producer.produce(
                settings.requests_topic,
                key=rid.encode(),
                value=serialize(value, SerializationContext(settings.requests_topic, MessageField.VALUE)),
            )
        assert producer.flush(30) == 0


def _terminal(events: list[dict[str, Any]], rid: str) -> dict[str, Any] | None:
    for event in events:
        if event["request_id"] == rid and _payload_type(event["payload"]) in ("Finished", "Failed"):
            return event
    return None


async def _send(settings: Settings, topic: str, key: str, value: bytes, name: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await start_client(producer)
    try:
        await producer.send_and_wait(topic, value, key=key.encode(), headers=record_headers(name))
    finally:
        await producer.stop()


async def test_registry_alone_decodes_every_topic_and_a_serializer_producer_is_served(
    kafka_bootstrap: str, topic_prefix: str, schema_registry_url: str, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix, schema_registry_url)
    await ensure_topics(settings)
    since_ms = int(time.time() * 1000) - 1000
    reader = RegistryOnlyReader(kafka_bootstrap, schema_registry_url)
    try:
        with worker_process(settings):
            served = [new_request_id() for _ in range(3)]
            await in_thread(lambda stop: _serializer_producer(stop, settings, schema_registry_url, served))
            # A long request, cancelled through the control topic by tokenrelay's own (Confluent-framed) writer.
            codec = await prepare_codec(settings)
            long_id = new_request_id()
            long_request = codec.encode(InferenceRequest(long_id, "a long story", 1000))
            await _send(settings, settings.requests_topic, long_id, long_request, "InferenceRequest")

            def started(events: list[dict[str, Any]]) -> bool:
                return any(e["request_id"] == long_id and "worker" in e["payload"] for e in events)

            await reader.events_until(settings.events_topic, 2, started)
            cancel = codec.encode(ControlEvent(long_id, "cancel", int(time.time() * 1000), "test"))
            await _send(settings, settings.control_topic, long_id, cancel, "ControlEvent")

            def all_ended(events: list[dict[str, Any]]) -> bool:
                return all(_terminal(events, rid) is not None for rid in [*served, long_id])

            events = await reader.events_until(settings.events_topic, 2, all_ended)

        for rid in served:
            finished = _terminal(events, rid)
            assert finished is not None and finished["payload"]["finish_reason"] == "length", finished
            deltas = [e["payload"] for e in events if e["request_id"] == rid and "token_ids" in e["payload"]]
            tokens = sum(len(d["token_ids"]) for d in deltas)
            assert finished["payload"]["usage"]["completion_tokens"] == tokens == MAX_TOKENS
        cancelled = _terminal(events, long_id)
        assert cancelled is not None and cancelled["payload"]["finish_reason"] == "cancelled"

        # Every record of every topic, decoded by the registry alone.
        counts = {}
        for topic, partitions in (
            (settings.requests_topic, 2),
            (settings.events_topic, 2),
            (settings.control_topic, 1),
            (settings.models_topic, 1),
        ):
            records = await reader.read_topic(topic, partitions)
            assert all(raw[:1] == b"\x00" for raw, _ in records), topic
            assert all(isinstance(value, dict) for _, value in records), topic
            counts[topic] = len(records)
        assert counts[settings.requests_topic] == 4 and counts[settings.control_topic] == 1
        assert counts[settings.events_topic] >= 4 * 3
        assert (await reader.read_topic(settings.dlq_topic, 1)) == []
    finally:
        reader.close()

    # `tokenrelay export --format parquet` reads the Confluent-framed log; DuckDB counts it.
    out = tmp_path / "events.parquet"
    assert await export(settings, since=str(since_ms), out=str(out), fmt="parquet") == 0
    import duckdb

    con = duckdb.connect()
    total, undecodable = con.execute("select count(*), count(undecodable) from read_parquet(?)", [str(out)]).fetchone()  # type: ignore[misc]
    assert total == counts[settings.events_topic] and undecodable == 0
    by_request = dict(
        con.execute(
            "select request_id, sum(token_count) from read_parquet(?) where type = 'Delta' group by request_id",
            [str(out)],
        ).fetchall()
    )
    usage = dict(
        con.execute(
            "select request_id, completion_tokens from read_parquet(?) where type = 'Finished'", [str(out)]
        ).fetchall()
    )
    assert usage == {rid: by_request.get(rid, 0) for rid in usage}
    assert all(usage[rid] == MAX_TOKENS for rid in served)


async def test_single_object_records_still_work(
    kafka_bootstrap: str, topic_prefix: str, schema_registry_url: str
) -> None:
    """A producer that still writes single-object encoding is served; the worker answers in Confluent framing."""
    settings = _settings(kafka_bootstrap, topic_prefix, schema_registry_url)
    await ensure_topics(settings)
    rid = new_request_id()
    legacy = default_codec().encode(InferenceRequest(rid, "hello", MAX_TOKENS))
    assert legacy[:2] == b"\xc3\x01"
    reader = RegistryOnlyReader(kafka_bootstrap, schema_registry_url)
    try:
        with worker_process(settings):
            await _send(settings, settings.requests_topic, rid, legacy, "InferenceRequest")
            events = await reader.events_until(settings.events_topic, 2, lambda evs: _terminal(evs, rid) is not None)
    finally:
        reader.close()
    finished = _terminal(events, rid)
    assert finished is not None and finished["payload"]["usage"]["completion_tokens"] == MAX_TOKENS


@pytest.mark.skipif(
    not QUIX_PYTHON.exists(),
    reason=f"no quixstreams venv at {QUIX_PYTHON} (quixstreams pins confluent-kafka<2.13: `make quix-venv` makes one, "
    "or set TOKENRELAY_TEST_QUIX_PYTHON)",
)
async def test_quixstreams_counts_the_tokens_of_each_request(
    kafka_bootstrap: str, topic_prefix: str, schema_registry_url: str, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, topic_prefix, schema_registry_url)
    await ensure_topics(settings)
    codec = await prepare_codec(settings)
    ids = [new_request_id() for _ in range(3)]
    reader = RegistryOnlyReader(kafka_bootstrap, schema_registry_url)
    try:
        with worker_process(settings):
            for n, rid in enumerate(ids):
                request = codec.encode(InferenceRequest(rid, f"story {n}", MAX_TOKENS + n))
                await _send(settings, settings.requests_topic, rid, request, "InferenceRequest")
            await reader.events_until(
                settings.events_topic, 2, lambda evs: all(_terminal(evs, rid) is not None for rid in ids)
            )
    finally:
        reader.close()
    argv = [str(QUIX_PYTHON), str(QUIX_APP), kafka_bootstrap, schema_registry_url, settings.events_topic, *ids]
    # Its own environment: nothing of this venv or of tokenrelay leaks into the quixstreams process.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    # Its cwd is a temporary directory: quixstreams keeps its state directory there.
    quix = await asyncio.create_subprocess_exec(*argv, stdout=PIPE, stderr=PIPE, env=env, cwd=tmp_path)
    try:
        stdout, stderr = await asyncio.wait_for(quix.communicate(), 240)
    finally:
        if quix.returncode is None:
            quix.kill()
            await quix.wait()
    assert quix.returncode == 0, stderr.decode()[-3000:]
    counts = json.loads(stdout.decode().strip().splitlines()[-1])
    assert set(counts) == set(ids)
    for n, rid in enumerate(ids):
        assert counts[rid]["delta_tokens"] == counts[rid]["usage"] == MAX_TOKENS + n, counts


async def test_auto_register_off_looks_up_the_registered_ids(topic_prefix: str, schema_registry_url: str) -> None:
    """Production mode: nothing is registered by the services; missing subjects are named in the error."""
    import dataclasses

    from schemas.errors import RegistryError

    settings = Settings(topic_prefix=topic_prefix, schema_registry_url=schema_registry_url)
    lookup_only = dataclasses.replace(settings, schema_registry_auto_register=False)
    with pytest.raises(RegistryError, match=f"{topic_prefix}events-value"):
        await prepare_codec(lookup_only, [settings.events_topic])
    registered = await prepare_codec(settings)
    looked_up = await prepare_codec(lookup_only)
    assert looked_up.schema_ids == {
        name: registered.schema_ids[name] for name in ("InferenceRequest", "TokenEvent", "ControlEvent", "ModelInfo")
    }


async def test_subjects_are_backward_compatible_so_a_string_schema_is_refused(
    topic_prefix: str, schema_registry_url: str
) -> None:
    """The review registered `"string"` as the latest tokenrelay.events-value (compatibility NONE)."""
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    settings = Settings(topic_prefix=topic_prefix, schema_registry_url=schema_registry_url)
    codec = await prepare_codec(settings, [settings.events_topic])
    subject = f"{settings.events_topic}-value"
    with SchemaRegistryClient({"url": schema_registry_url}) as client:
        assert client.get_compatibility(subject) == "BACKWARD"
        with pytest.raises(SchemaRegistryError) as refused:
            client.register_schema(subject, Schema('"string"', "AVRO"))
        assert refused.value.http_status_code == 409
        assert client.get_latest_version(subject).schema_id == codec.schema_ids["TokenEvent"]

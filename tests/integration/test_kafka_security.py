"""Least privilege on the secure broker: each role can do its job and nothing else (SASL_SSL, SCRAM, ACLs on)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)

from schemas.errors import KafkaUnavailable
from services.kafka import make_consumer, make_producer, start_client
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.gateway_support import gateway_settings
from tests.integration.secure_support import SecureBootstrap, as_role

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
async def stack(secure_kafka_bootstrap: SecureBootstrap, topic_prefix: str) -> Settings:
    """The admin's settings of a fresh prefix: its topics made, every role's ACLs granted."""
    settings = gateway_settings(secure_kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    return settings


async def write(settings: Settings, topic: str, start_timeout_s: float = 20) -> None:
    producer = make_producer(settings, request_timeout_ms=10_000)
    try:
        await start_client(producer, timeout_s=start_timeout_s)
        await asyncio.wait_for(producer.send_and_wait(topic, b"x", key=b"k"), 20)
    finally:
        await producer.stop()


async def join(settings: Settings, topic: str, group: str) -> None:
    """Join ``group`` consuming ``topic`` until the first poll after the assignment."""
    consumer = make_consumer(settings, topic, group_id=group, session_timeout_ms=6000)
    try:
        await start_client(consumer, timeout_s=20)
        await asyncio.wait_for(consumer.getmany(timeout_ms=2000), 30)
        await asyncio.wait_for(_until_assigned(consumer), 30)
    finally:
        await consumer.stop()


async def _until_assigned(consumer: object) -> None:
    while not consumer.assignment():  # type: ignore[attr-defined]
        await consumer.getmany(timeout_ms=200)  # type: ignore[attr-defined]


async def test_each_role_does_its_job(stack: Settings) -> None:
    s = stack
    await write(as_role(s, "producer"), s.requests_topic_for("default"))
    await write(as_role(s, "gateway"), s.requests_topic)
    await write(as_role(s, "gateway"), s.control_topic)
    await write(as_role(s, "gateway"), s.events_topic)
    await join(as_role(s, "gateway"), s.events_topic, s.gateway_group)
    await write(as_role(s, "worker"), s.events_topic)
    await write(as_role(s, "worker"), s.models_topic)
    await write(as_role(s, "worker"), s.dlq_topic)
    await join(as_role(s, "worker"), s.requests_topic, s.worker_group)
    await join(as_role(s, "analytics"), s.events_topic, f"{s.topic_prefix}analytics")


@pytest.mark.parametrize(
    ("role", "what", "topic"),
    [
        ("producer", "write", "models"),
        ("producer", "write", "events"),
        ("producer", "write", "control"),
        ("producer", "write", "requests.dlq"),
        ("analytics", "write", "events"),
        ("analytics", "write", "requests.default"),
        ("gateway", "write", "models"),
        ("gateway", "write", "requests.dlq"),
        ("worker", "write", "requests.default"),
        ("worker", "write", "control"),
    ],
)
async def test_forbidden_writes_fail(stack: Settings, role: str, what: str, topic: str) -> None:
    with pytest.raises(TopicAuthorizationFailedError):
        await write(as_role(stack, role), stack.topic(topic))


@pytest.mark.parametrize(
    ("role", "topic", "group"),
    [
        ("producer", "events", "gateways"),  # the rogue gateway of the review: cannot join the gateways' group
        ("worker", "events", "gateways"),
        ("analytics", "events", "gateways"),
        ("producer", "requests.default", "workers.default"),  # nor read requests as a worker
        ("gateway", "requests.default", "workers.default"),
    ],
)
async def test_forbidden_groups_fail(stack: Settings, role: str, topic: str, group: str) -> None:
    with pytest.raises((KafkaUnavailable, GroupAuthorizationFailedError, TopicAuthorizationFailedError)) as caught:
        await join(as_role(stack, role), stack.topic(topic), stack.topic(group))
    refusal = caught.value.__cause__ if isinstance(caught.value, KafkaUnavailable) else caught.value
    assert isinstance(refusal, GroupAuthorizationFailedError | TopicAuthorizationFailedError)


async def test_a_wrong_password_is_refused(stack: Settings) -> None:
    wrong = dataclasses.replace(as_role(stack, "producer"), kafka_sasl_password=uuid.uuid4().hex)
    # aiokafka reports it as a failed bootstrap (the SASL error is in its log), which start_client retries.
    with pytest.raises(KafkaUnavailable, match="Unable to bootstrap"):
        await write(wrong, stack.requests_topic, start_timeout_s=1)

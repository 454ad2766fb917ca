"""Least privilege on the secure broker: each role can do its job and nothing else (SASL_SSL, SCRAM, ACLs on)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)

from schemas.errors import ConfigError, KafkaUnavailable, MissingToolError
from services.kafka import make_consumer, make_producer, start_client
from services.local.broker.runner import LocalBroker, free_port
from services.local.broker.secure import ADMIN
from services.local.process import quiet_env
from services.local.registry.runner import LocalRegistry, java_binary
from services.schema_registry import prepare_codec
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.analytics_support import Analytics
from tests.integration.gateway_support import gateway_settings
from tests.integration.scripted_events import barrier, produce
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


async def test_a_wrong_password_or_an_unknown_ca_fails_at_once(stack: Settings) -> None:
    """Not retried for a minute as if the cluster were down: the first attempt says what is refused."""
    wrong = dataclasses.replace(as_role(stack, "producer"), kafka_sasl_password=uuid.uuid4().hex)
    with pytest.raises(ConfigError, match=r"refuses this client: .*SaslAuthenticationFailed"):
        await write(wrong, stack.requests_topic, start_timeout_s=60)
    # The system trust store does not know the local broker's own CA.
    untrusted = dataclasses.replace(as_role(stack, "producer"), kafka_ssl_ca_file="")
    with pytest.raises(ConfigError, match=r"refuses this client: .*CERTIFICATE_VERIFY_FAILED"):
        await write(untrusted, stack.requests_topic, start_timeout_s=60)


@pytest.mark.timeout(420)  # the registry's own start may take up to its 300 s ready timeout on a loaded machine
async def test_the_registry_keeps_its_schemas_on_the_secure_broker_as_its_role(stack: Settings, tmp_path: Path) -> None:
    """Apicurio's KafkaSQL storage gets the security settings (as Java client properties) and needs no more than
    the registry role's ACLs."""
    try:
        java_binary()
    except MissingToolError as exc:
        pytest.skip(f"no Java 21+ for the embedded schema registry: {exc.message}")
    registry = LocalRegistry(as_role(stack, "registry"), 0, log_dir=tmp_path)
    properties = tmp_path / "config" / "application.properties"
    try:
        url = await asyncio.to_thread(registry.start)
        assert oct(properties.stat().st_mode & 0o777) == "0o600"
        assert "apicurio.kafka.common.sasl.jaas.config" in properties.read_text()
        codec = await prepare_codec(dataclasses.replace(stack, schema_registry_url=url), [stack.events_topic])
        assert codec.schema_ids["TokenEvent"] > 0
    finally:
        await asyncio.to_thread(registry.stop)


async def test_analytics_counts_as_its_role(stack: Settings, tmp_path: Path) -> None:
    """faust gets the credentials (broker_credentials): it reads events, keeps its changelogs and group, as
    `analytics`."""
    port = free_port()
    role = as_role(dataclasses.replace(stack, analytics_port=port, cache_dir=tmp_path / "cache"), "analytics")
    service = Analytics({**os.environ, **quiet_env(role)}, port, tmp_path / "analytics.log")
    fence, fenced, tenants = barrier(stack.events_partitions, "secure")
    await produce(stack, fence)
    service.start()
    try:
        usage = await asyncio.to_thread(service.wait_tenants, tenants)
        assert usage["totals"]["completion_tokens"] == fenced.completion_tokens
    finally:
        assert service.proc is not None
        service.proc.kill()
        service.proc.wait()


async def test_a_role_that_may_not_create_topics_says_who_should(
    secure_kafka_bootstrap: SecureBootstrap, topic_prefix: str
) -> None:
    settings = as_role(gateway_settings(secure_kafka_bootstrap, topic_prefix), "gateway")
    with pytest.raises(KafkaUnavailable, match=r"gateway may not create it: an admin creates the topics"):
        await ensure_topics(settings)


def unsigned_jwt(subject: str, lifetime_s: int = 3600) -> str:
    """A token Kafka's unsecured OAUTHBEARER validator (for tests only) accepts: alg none, ``sub`` the principal."""

    def part(claims: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")

    now = int(time.time())
    return f"{part({'alg': 'none'})}.{part({'sub': subject, 'iat': now, 'exp': now + lifetime_s})}."


async def test_oauthbearer_tokens_from_a_file_and_a_command_are_principals_with_acls(tmp_path: Path) -> None:
    """OAUTHBEARER end to end: the token is read from its file (or printed by its command) at authentication, the
    broker takes its subject as the principal, and that principal's ACLs apply. The broker's validator here accepts
    unsigned tokens, which only a test may do; a real one checks them against its identity provider's keys."""
    oauth = {
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,OAUTHBEARER",
        "listener.name.sasl_ssl.oauthbearer.sasl.jaas.config": (
            "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required ;"
        ),
    }
    broker = LocalBroker(Settings(), 0, tmp_path / "broker", console=False, secure=True, extra_properties=oauth)
    try:
        await asyncio.to_thread(broker.start)
        admin = broker.client_settings(ADMIN, Settings(topic_prefix="oauth."))
        await ensure_topics(admin)
        await asyncio.to_thread(broker.grant_roles, admin)
        token_file = tmp_path / "token"
        token_file.write_text(unsigned_jwt("producer"))
        by_file = dataclasses.replace(
            admin,
            kafka_sasl_mechanism="OAUTHBEARER",
            kafka_sasl_username="",
            kafka_sasl_password="",
            kafka_sasl_oauth_token_file=str(token_file),
        )
        await write(by_file, admin.requests_topic)
        with pytest.raises(TopicAuthorizationFailedError):
            await write(by_file, admin.models_topic)
        by_command = dataclasses.replace(
            by_file, kafka_sasl_oauth_token_file="", kafka_sasl_oauth_token_command=f"cat {token_file}"
        )
        await write(by_command, admin.requests_topic)
    finally:
        await asyncio.to_thread(broker.stop)

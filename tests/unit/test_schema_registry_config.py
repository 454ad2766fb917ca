"""Schema registry settings, subjects and the embedded registry's command line, without a registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import ConfigError
from services.local.registry.runner import apicurio_version, ccompat_url, jvm_command
from services.schema_registry import client_config, subject_name, value_record, value_topics
from services.settings import Settings


def test_subject_strategies() -> None:
    assert subject_name("topic", "tokenrelay.events", "TokenEvent") == "tokenrelay.events-value"
    assert subject_name("record", "tokenrelay.events", "TokenEvent") == "io.tokenrelay.TokenEvent"
    assert subject_name("topic_record", "t.events", "TokenEvent") == "t.events-io.tokenrelay.TokenEvent"
    with pytest.raises(ConfigError):
        subject_name("sideways", "t", "TokenEvent")


def test_every_avro_topic_names_its_record() -> None:
    settings = Settings(topic_prefix="x.")
    assert value_record(settings, "x.requests.default") == "InferenceRequest"
    assert value_record(settings, "x.requests.other-model") == "InferenceRequest"
    assert value_record(settings, "x.batch.default") == "InferenceRequest"
    assert value_record(settings, "x.events") == "TokenEvent"
    assert value_record(settings, "x.control") == "ControlEvent"
    assert value_record(settings, "x.models") == "ModelInfo"
    assert value_record(settings, "x.requests.dlq") is None
    assert value_record(settings, "y.events") is None
    topics = value_topics(settings)
    assert settings.events_topic in topics and settings.dlq_topic not in topics
    assert settings.requests_topic_for("default", "batch") in topics


def test_client_config_passes_auth_and_ca_through() -> None:
    base = Settings(schema_registry_url="https://sr.example:8081")
    assert client_config(base) == {"url": "https://sr.example:8081", "timeout": 10}
    basic = client_config(Settings(schema_registry_url="https://sr", schema_registry_basic_auth="u:p"))
    assert basic["basic.auth.user.info"] == "u:p"
    bearer = client_config(
        Settings(schema_registry_url="https://sr", schema_registry_bearer_token="tok", schema_registry_ca_file="/ca")
    )
    assert bearer["bearer.auth.credentials.source"] == "STATIC_TOKEN" and bearer["bearer.auth.token"] == "tok"
    assert bearer["ssl.ca.location"] == "/ca"
    with pytest.raises(ConfigError):
        client_config(Settings())
    with pytest.raises(ConfigError):
        client_config(Settings(schema_registry_url="https://sr", schema_registry_basic_auth="no-colon"))


def test_client_config_is_accepted_by_confluent_kafka() -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    settings = Settings(schema_registry_url="https://sr:8081", schema_registry_bearer_token="tok")
    SchemaRegistryClient(client_config(settings)).close()


def test_auto_register_reads_as_a_boolean() -> None:
    assert (
        Settings.from_env({"TOKENRELAY_SCHEMA_REGISTRY_AUTO_REGISTER": "false"}).schema_registry_auto_register is False
    )
    assert Settings.from_env({}).schema_registry_auto_register is True
    with pytest.raises(ConfigError):
        Settings.from_env({"TOKENRELAY_SCHEMA_REGISTRY_AUTO_REGISTER": "perhaps"})


def test_embedded_registry_command() -> None:
    argv = jvm_command(
        "/jdk/bin/java",
        Path("/app/quarkus-run.jar"),
        port=18081,
        management_port=18082,
        bootstrap="k:9092",
        topic_prefix="p.",
        heap_mb=200,
    )
    assert argv[0] == "/jdk/bin/java" and argv[-2:] == ["-jar", "/app/quarkus-run.jar"]
    assert "-Dquarkus.http.port=18081" in argv and "-Dapicurio.kafkasql.bootstrap.servers=k:9092" in argv
    assert "-Dapicurio.storage.kind=kafkasql" in argv and "-Dapicurio.kafkasql.topic=p.schemas" in argv
    assert "-Dquarkus.management.port=18082" in argv and "-Xmx200m" in argv
    assert ccompat_url(18081) == "http://127.0.0.1:18081/apis/ccompat/v7"
    assert apicurio_version() == "3.3.3"


async def test_prepare_codec_waits_for_a_registry_then_gives_up_clearly() -> None:
    """A registry that is not up yet (connection refused) is retried until the deadline, then a retriable error."""
    import socket

    from schemas.errors import RegistryError
    from services.schema_registry import prepare_codec

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(schema_registry_url=f"http://127.0.0.1:{port}/apis/ccompat/v7")
    with pytest.raises(RegistryError) as info:
        await prepare_codec(settings, [settings.events_topic], wait_s=1.5)
    assert info.value.retriable and "did not answer" in info.value.message


class _Registry:
    """A registry client that keeps config only for subjects that exist (as Apicurio does)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.subjects: set[str] = set()
        self.level: str | None = None

    async def set_compatibility(self, subject_name: str, level: str) -> str:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if subject_name not in self.subjects:
            raise SchemaRegistryError(404, 40401, "subject not found")
        if self.level is not None:
            raise SchemaRegistryError(409, 0, "A rule named 'COMPATIBILITY' already exists.")
        self.level = level
        self.calls.append(("compatibility", level))
        return level

    async def get_compatibility(self, subject_name: str) -> str:
        assert self.level is not None
        return self.level

    async def register_schema(self, subject: str, schema: object) -> int:
        self.subjects.add(subject)
        self.calls.append(("register", subject))
        return 7


async def test_each_subject_gets_the_compatibility_level_around_its_first_registration() -> None:
    from services.schema_registry import Subjects

    client = _Registry()
    subjects = Subjects(Settings(schema_registry_url="http://sr"), client=client)
    assert await subjects.ensure("tokenrelay.events") == 7
    assert client.calls == [("register", "tokenrelay.events-value"), ("compatibility", "BACKWARD")]
    client.calls.clear()
    client.level = None
    again = Subjects(Settings(schema_registry_url="http://sr", schema_registry_compatibility="full"), client=client)
    await again.ensure("tokenrelay.events")  # an existing subject: the level first, then the schema is checked
    assert client.calls == [("compatibility", "FULL"), ("register", "tokenrelay.events-value")]
    client.calls.clear()
    # Another process set it first (Apicurio: 409 "rule already exists"): registering goes on.
    third = Subjects(Settings(schema_registry_url="http://sr"), client=client)
    assert await third.ensure("tokenrelay.events") == 7
    assert client.calls == [("register", "tokenrelay.events-value")]


def test_an_unknown_schema_id_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from schemas.errors import UnknownSchemaId
    from services import schema_registry

    lookups = []

    class Client:
        def __init__(self, conf: object) -> None:
            pass

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def get_schema(self, schema_id: int) -> object:
            lookups.append(schema_id)
            raise SchemaRegistryError(404, 40403, "Schema not found")

    monkeypatch.setattr("confluent_kafka.schema_registry.SchemaRegistryClient", Client)
    resolve = schema_registry.registry_resolver(Settings(schema_registry_url="http://sr"))
    for _ in range(1000):
        with pytest.raises(UnknownSchemaId, match="schema id 41 is not in the schema registry"):
            resolve(41)
    assert lookups == [41]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "http://sr" in errors[0].getMessage()

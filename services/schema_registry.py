"""Schema registry client: registers the `.avsc` schemas under their topics' subjects and resolves ids.

Writers need one id per record name (``prepare_codec``, at start); readers resolve ids written by other
producers through ``registry_resolver``, a blocking lookup cached per id (once per schema version and process).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from schemas.codec import Codec, SchemaRegistry, SchemaResolver, default_registry
from schemas.errors import ConfigError, DecodeError, RegistryError, SchemaUnavailable, UnknownSchemaId
from services.settings import SUBJECT_STRATEGIES, Settings

log = logging.getLogger(__name__)

NAMESPACE = "io.tokenrelay"
STRATEGIES = SUBJECT_STRATEGIES
# How long services wait at start for a registry that is still starting (the embedded one needs ~50 s).
READY_WAIT_S = 300.0
# After the registry failed to answer, reads of unknown ids fail fast for this long instead of blocking again.
_UNAVAILABLE_BACKOFF_S = 5.0
_UNKNOWN_IDS_KEPT = 4096


def client_config(settings: Settings) -> dict[str, Any]:
    """confluent-kafka SchemaRegistryClient configuration from the settings."""
    if not settings.schema_registry_url:
        raise ConfigError("no schema registry configured (TOKENRELAY_SCHEMA_REGISTRY_URL)")
    conf: dict[str, Any] = {"url": settings.schema_registry_url, "timeout": 10}
    if settings.schema_registry_basic_auth:
        if ":" not in settings.schema_registry_basic_auth:
            raise ConfigError("TOKENRELAY_SCHEMA_REGISTRY_BASIC_AUTH must be user:password")
        conf["basic.auth.user.info"] = settings.schema_registry_basic_auth
    if settings.schema_registry_bearer_token:
        if settings.schema_registry_basic_auth:
            raise ConfigError("set either basic auth or a bearer token for the schema registry, not both")
        conf["bearer.auth.credentials.source"] = "STATIC_TOKEN"
        conf["bearer.auth.token"] = settings.schema_registry_bearer_token
        # The client insists on Confluent Cloud's logical-cluster header; other registries ignore an empty one.
        conf["bearer.auth.logical.cluster"] = ""
    if settings.schema_registry_ca_file:
        conf["ssl.ca.location"] = settings.schema_registry_ca_file
    return conf


def subject_name(strategy: str, topic: str, record: str) -> str:
    """Subject of ``topic``'s values under a subject-name strategy (Confluent's three)."""
    full = record if "." in record else f"{NAMESPACE}.{record}"
    strategy = strategy.lower()
    if strategy == "topic":
        return f"{topic}-value"
    if strategy == "record":
        return full
    if strategy == "topic_record":
        return f"{topic}-{full}"
    raise ConfigError(f"unknown subject strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")


def value_record(settings: Settings, topic: str) -> str | None:
    """Name of the record a topic's values carry, or None (the DLQ keeps raw bytes; foreign topics)."""
    if not topic.startswith(settings.topic_prefix):
        return None
    name = topic[len(settings.topic_prefix) :]
    if name == "requests.dlq":
        return None
    if name == "requests" or name.startswith(("requests.", "batch.")):
        return "InferenceRequest"
    return {"events": "TokenEvent", "control": "ControlEvent", "models": "ModelInfo"}.get(name)


def value_topics(settings: Settings) -> list[str]:
    """The design's topics whose values are Avro records (from services/topics.py)."""
    from services.topics import topic_specs

    return [spec.name for spec in topic_specs(settings) if value_record(settings, spec.name) is not None]


class Subjects:
    """Registers (or, with auto-register off, looks up) the newest schema of each record under its subjects."""

    def __init__(self, settings: Settings, schemas: SchemaRegistry | None = None, client: Any = None):
        from confluent_kafka.schema_registry import AsyncSchemaRegistryClient

        if settings.schema_registry_subject_strategy.lower() not in STRATEGIES:
            raise ConfigError(
                f"TOKENRELAY_SCHEMA_REGISTRY_SUBJECT_STRATEGY={settings.schema_registry_subject_strategy!r}: "
                f"use one of {', '.join(STRATEGIES)}"
            )
        self.settings = settings
        self.schemas = schemas or default_registry()
        self.client = client or AsyncSchemaRegistryClient(client_config(settings))
        self.ids: dict[str, int] = {}  # subject -> id

    async def ensure(self, topic: str, record: str | None = None) -> int:
        """Id of the newest schema of ``topic``'s record, registered under the topic's subject if needed."""
        record = record or value_record(self.settings, topic)
        if record is None:
            raise ConfigError(f"topic {topic} carries no tokenrelay record")
        subject = subject_name(self.settings.schema_registry_subject_strategy, topic, record)
        cached = self.ids.get(subject)
        if cached is not None:
            return cached
        schema_id = await self._register(subject, record)
        self.ids[subject] = schema_id
        log.info("schema %s.%s is id %d under subject %s", NAMESPACE, record, schema_id, subject)
        return schema_id

    async def ensure_record(self, record: str) -> int:
        """Id of the newest schema of ``record`` under its record-name subject (``io.tokenrelay.<Name>``)."""
        subject = subject_name("record", "", record)
        if subject not in self.ids:
            self.ids[subject] = await self._register(subject, record)
        return self.ids[subject]

    async def _register(self, subject: str, record: str) -> int:
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        schema = Schema(self.schemas.schema_json(record), "AVRO")
        try:
            if self.settings.schema_registry_auto_register:
                if await self._set_compatibility(subject):
                    return int(await self.client.register_schema(subject, schema))
                # A registry that keeps config only for existing subjects (Apicurio): the first version, then the level.
                schema_id = int(await self.client.register_schema(subject, schema))
                await self._set_compatibility(subject)
                return schema_id
            found = await self.client.lookup_schema(subject, schema)
            if found.schema_id is None:
                raise RegistryError(f"the schema registry gave no id for {record} under {subject}")
            return int(found.schema_id)
        except SchemaRegistryError as exc:
            if not self.settings.schema_registry_auto_register and exc.http_status_code == 404:
                raise RegistryError(
                    f"schema {NAMESPACE}.{record} is not registered under subject {subject} and auto-registration "
                    "is off (TOKENRELAY_SCHEMA_REGISTRY_AUTO_REGISTER=false): register schemas/avro/ there first"
                ) from exc
            raise RegistryError(f"the schema registry refused {record} under {subject}: {exc}") from exc

    async def _set_compatibility(self, subject: str) -> bool:
        """Set the subject's compatibility level; False when the subject does not exist yet.

        With NONE (a registry's default, Apicurio's among them) any schema, even a plain "string", could become the
        subject's latest.
        """
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        level = self.settings.schema_registry_compatibility.upper()
        try:
            await self.client.set_compatibility(subject_name=subject, level=level)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return False
            if exc.http_status_code in (401, 403):
                # A registry run by others may keep its config to its admins; registering still works.
                log.warning("cannot set compatibility %s on subject %s (%s); registering anyway", level, subject, exc)
                return True
            if exc.http_status_code == 409:
                # Apicurio answers a second PUT (another process set it first) with "rule already exists".
                current = str(await self.client.get_compatibility(subject_name=subject)).upper()
                if current != level:
                    log.warning(
                        "subject %s keeps compatibility %s (not %s): its owner chose it", subject, current, level
                    )
                return True
            raise
        return True

    async def close(self) -> None:
        await self.client.aclose()


async def prepare_codec(
    settings: Settings, topics: Iterable[str] | None = None, *, wait_s: float = READY_WAIT_S
) -> Codec:
    """A codec for a service: Confluent framing with every record's id when a registry is configured.

    Registers the newest `.avsc` schema of each record under the subject of each topic in ``topics`` (default:
    the design's topics), waiting up to ``wait_s`` for a registry that is still starting. Without a registry the
    codec writes single-object encoding (with a warning).
    """
    if not settings.schema_registry_url:
        log.warning(
            "no schema registry configured (TOKENRELAY_SCHEMA_REGISTRY_URL): writing Avro single-object encoding, "
            "which Kafka tools with a registry cannot read"
        )
        return Codec(default_registry())
    wanted = list(value_topics(settings) if topics is None else topics)
    subjects = Subjects(settings)
    deadline = time.monotonic() + wait_s
    try:
        by_record: dict[str, int] = {}
        for topic in wanted:
            record = value_record(settings, topic)
            if record is None or record not in subjects.schemas.names():
                continue
            by_record[record] = await _retry_until(deadline, lambda t=topic, r=record: subjects.ensure(t, r))
        if settings.schema_registry_auto_register and topics is None:
            # Every `.avsc` record gets an id, also one no design topic carries: under its record-name subject.
            for record in subjects.schemas.names():
                if record not in by_record:
                    by_record[record] = await _retry_until(deadline, lambda r=record: subjects.ensure_record(r))
    finally:
        await subjects.close()
    return Codec(default_registry(), schema_ids=by_record, resolve=registry_resolver(settings))


async def _retry_until(deadline: float, call: Any) -> int:
    """``await call()``, again while the registry is not reachable yet (connection refused, 5xx)."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    while True:
        try:
            return int(await call())
        except RegistryError as exc:
            cause = exc.__cause__
            unavailable = isinstance(cause, SchemaRegistryError) and cause.http_status_code >= 500
            if not unavailable or time.monotonic() > deadline:
                raise
            log.info("schema registry not ready (%s); retrying", cause)
        except (OSError, _http_errors()) as exc:
            if time.monotonic() > deadline:
                raise RegistryError(f"the schema registry did not answer: {exc}", retriable=True) from exc
            log.info("schema registry not reachable yet (%s); retrying", exc)
        await asyncio.sleep(1.0)


def _http_errors() -> type[Exception]:
    # confluent-kafka's client runs on httpx2 when it is installed, else on httpx (its _httpx_compat).
    import importlib

    try:
        module = importlib.import_module("httpx2")
    except ImportError:
        module = importlib.import_module("httpx")
    error: type[Exception] = module.TransportError
    return error


class _Resolver:
    """Blocking, cached id → schema lookups; unknown ids remembered, an unreachable registry backed off."""

    def __init__(self, settings: Settings):
        self._conf = client_config(settings)
        self._lock = threading.Lock()
        self._unknown: dict[int, str] = {}
        self._down_until = 0.0

    def __call__(self, schema_id: int) -> str:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        with self._lock:
            if schema_id in self._unknown:
                raise UnknownSchemaId(self._unknown[schema_id])
            if time.monotonic() < self._down_until:
                raise SchemaUnavailable(f"schema id {schema_id}: the schema registry did not answer just now")
            try:
                # A client per lookup: lookups are rare (each id once per process) and nothing stays open.
                with SchemaRegistryClient({**self._conf, "timeout": 5, "max.retries": 1}) as client:
                    schema = client.get_schema(schema_id)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404 or 400 <= exc.http_status_code < 500:
                    message = f"schema id {schema_id} is not in the schema registry"
                    if len(self._unknown) >= _UNKNOWN_IDS_KEPT:
                        self._unknown.clear()
                    self._unknown[schema_id] = message
                    # Once per id and process: its further records fail from the cache without a word here.
                    log.error(
                        "%s at %s (HTTP %s): records carrying it cannot be decoded. Was the registry's storage reset "
                        "or another registry configured? Writers register their schemas again when they restart.",
                        message,
                        self._conf["url"],
                        exc.http_status_code,
                    )
                    raise UnknownSchemaId(message) from exc
                self._down_until = time.monotonic() + _UNAVAILABLE_BACKOFF_S
                raise SchemaUnavailable(f"schema id {schema_id}: the schema registry failed: {exc}") from exc
            except Exception as exc:  # transport errors of httpx, which the client lets through
                self._down_until = time.monotonic() + _UNAVAILABLE_BACKOFF_S
                raise SchemaUnavailable(f"schema id {schema_id}: the schema registry did not answer: {exc}") from exc
        if (schema.schema_type or "AVRO") != "AVRO":
            raise DecodeError(f"schema id {schema_id} is a {schema.schema_type} schema, not Avro")
        return str(schema.schema_str)


def registry_resolver(settings: Settings) -> SchemaResolver:
    """A SchemaResolver for the Codec that asks the configured registry (blocking; each id once)."""
    return _Resolver(settings)


def reading_codec(settings: Settings) -> Codec:
    """A codec for a reader that writes nothing: resolves Confluent ids through the registry when one is set."""
    if not settings.schema_registry_url:
        return Codec(default_registry())
    return Codec(default_registry(), resolve=registry_resolver(settings))

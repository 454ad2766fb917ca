"""Idempotent creation and description of the design's topics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from schemas.errors import ConfigError, KafkaUnavailable
from schemas.records import PRIORITIES
from services.kafka import admin as admin_client
from services.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def requests_topic_specs(settings: Settings, model: str) -> list[TopicSpec]:
    """The request topics of one served model: one per service class (``requests.<model>``, ``batch.<model>``)."""
    return [
        TopicSpec(
            settings.requests_topic_for(model, priority),
            settings.requests_partitions,
            {"retention.ms": str(settings.requests_retention_ms), "cleanup.policy": "delete"},
        )
        for priority in PRIORITIES
    ]


def batch_api_topic_specs(settings: Settings) -> list[TopicSpec]:
    """The Batch API's state: file contents (deleted after the window and a margin) and its compacted objects."""
    return [
        TopicSpec(
            settings.files_topic, 1, {"retention.ms": str(settings.files_retention_ms), "cleanup.policy": "delete"}
        ),
        TopicSpec(
            settings.batches_topic,
            1,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3600 * 1000)},
        ),
    ]


def topic_specs(settings: Settings, models: Sequence[str] | None = None) -> list[TopicSpec]:
    """The design's topics with partitions and retention from settings; the request topics of ``models``.

    ``models`` defaults to the settings' served model, so a stack of one model needs no list.
    """
    requests_retention = str(settings.requests_retention_ms)
    names = [settings.served_model] if models is None else list(models)
    return [
        *(spec for name in names for spec in requests_topic_specs(settings, name)),
        TopicSpec(
            settings.events_topic,
            settings.events_partitions,
            # LogAppendTime makes offsets_for_times agree with the broker's clock, not the worker's.
            {
                "retention.ms": str(settings.events_retention_ms),
                "cleanup.policy": "delete",
                "message.timestamp.type": "LogAppendTime",
            },
        ),
        TopicSpec(
            settings.control_topic,
            settings.control_partitions,
            {"retention.ms": str(3600 * 1000), "cleanup.policy": "delete"},
        ),
        TopicSpec(settings.dlq_topic, 1, {"retention.ms": requests_retention, "cleanup.policy": "delete"}),
        # Read whole by every gateway from a lease back: kept a little longer than that.
        TopicSpec(
            settings.quotas_topic,
            1,
            {
                "retention.ms": str(settings.quota_lease_ms + 3600 * 1000),
                "cleanup.policy": "delete",
                "message.timestamp.type": "LogAppendTime",
            },
        ),
        *batch_api_topic_specs(settings),
        # Compacted: the last announcement of each model stays, so a gateway that starts knows the models at once.
        TopicSpec(
            settings.models_topic,
            1,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3600 * 1000)},
        ),
    ]


def replication_config(settings: Settings) -> dict[str, str]:
    """Topic configs every created topic gets from settings; ConfigError when acks=all could never succeed."""
    if settings.replication_factor < 1 or settings.min_insync_replicas < 1:
        raise ConfigError("TOKENRELAY_REPLICATION_FACTOR and TOKENRELAY_MIN_INSYNC_REPLICAS must be at least 1")
    if settings.min_insync_replicas > settings.replication_factor:
        raise ConfigError(
            f"TOKENRELAY_MIN_INSYNC_REPLICAS={settings.min_insync_replicas} exceeds "
            f"TOKENRELAY_REPLICATION_FACTOR={settings.replication_factor}: no acks=all write could succeed"
        )
    return {"min.insync.replicas": str(settings.min_insync_replicas)}


async def ensure_topics(
    settings: Settings,
    *,
    specs: list[TopicSpec] | None = None,
    models: Sequence[str] | None = None,
    timeout_s: float = 60.0,
) -> list[str]:
    """Create every missing topic (the design's, with the requests topics of ``models``, unless specs are given);
    existing ones are left as they are. Returns the names created.
    """
    wanted = topic_specs(settings, models) if specs is None else specs
    replication = replication_config(settings)
    async with admin_client(settings, timeout_s=timeout_s) as admin:
        existing = set(await admin.list_topics())
        missing = [spec for spec in wanted if spec.name not in existing]
        created = []
        for spec in missing:
            try:
                response = await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            spec.partitions,
                            settings.replication_factor,
                            topic_configs={**replication, **spec.config},
                        )
                    ]
                )
            except TopicAlreadyExistsError:
                continue  # another process created it between list and create
            for _name, code, *rest in getattr(response, "topic_errors", ()):
                if code in (TopicAuthorizationFailedError.errno, ClusterAuthorizationFailedError.errno):
                    who = settings.kafka_sasl_username or "this client"
                    raise KafkaUnavailable(
                        f"topic {spec.name} does not exist and {who} may not create it: an admin creates the topics "
                        "(`tokenrelay topics` with an admin principal)"
                    )  # retriable: a worker waits until the admin has made them
                if code not in (0, TopicAlreadyExistsError.errno):
                    message = rest[0] if rest else ""
                    raise KafkaUnavailable(f"cannot create topic {spec.name}: error {code} {message}", retriable=False)
            created.append(spec.name)
            log.info(
                "created topic %s (%d partitions, replication factor %d, min.insync.replicas %s)",
                spec.name,
                spec.partitions,
                settings.replication_factor,
                replication["min.insync.replicas"],
            )
        await _wait_visible(admin, [s.name for s in wanted], timeout_s)
        return created


async def describe_topics(settings: Settings, names: Sequence[str] | None = None) -> dict[str, int]:
    """Partition count of each topic (the design's unless ``names`` are given); 0 for a missing one."""
    async with admin_client(settings) as admin:
        names = [spec.name for spec in topic_specs(settings)] if names is None else list(names)
        existing = set(await admin.list_topics())
        present = [n for n in names if n in existing]
        counts = dict.fromkeys(names, 0)
        if present:
            for topic in await admin.describe_topics(present):
                counts[topic["topic"]] = len(topic["partitions"])
        return counts


async def _wait_visible(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        existing = set(await admin.list_topics())
        if all(n in existing for n in names):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise KafkaUnavailable(f"topics not visible after {timeout_s}s: {sorted(set(names) - existing)}")
        await asyncio.sleep(0.2)

"""Least privilege per role: the Kafka ACLs each tokenrelay component needs, as data, commands and admin calls."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from schemas.errors import KafkaUnavailable
from services.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("worker", "gateway", "analytics", "producer", "registry")
# Apicurio's KafkaSQL storage names its consumer groups with this prefix (apicurio.kafkasql.consumer.group-prefix).
REGISTRY_GROUP_PREFIX = "apicurio-"


@dataclass(frozen=True, slots=True)
class Acl:
    """One ACL of a role: ``operation`` on a topic or group named ``name`` (or starting with it, when prefixed)."""

    resource: str  # "topic" | "group"
    name: str
    operation: str  # READ, WRITE, DESCRIBE, CREATE, ALL
    prefixed: bool = False
    deny: bool = False

    def command(self, principal: str) -> str:
        """The ``kafka-acls.sh`` line that adds it."""
        kind = "--deny-principal" if self.deny else "--allow-principal"
        pattern = " --resource-pattern-type prefixed" if self.prefixed else ""
        return (
            f"kafka-acls.sh --bootstrap-server $BOOTSTRAP --command-config admin.properties --add {kind} {principal} "
            f"--operation {self.operation.capitalize()} --{self.resource} '{self.name}'{pattern}"
        )


def role_acls(settings: Settings, role: str, models: Sequence[str]) -> list[Acl]:
    """The ACLs of ``role`` for the topics and groups of ``settings`` (its prefix) and the served ``models``."""
    p = settings.topic_prefix
    # Every role may see the stack's topics exist (metadata, partition counts): what ensure_topics needs to find
    # them all made and create none.
    see = Acl("topic", p, "DESCRIBE", prefixed=True)
    if role == "worker":
        intake = [
            Acl("topic", settings.requests_topic_for(m, c), "READ") for m in models for c in ("interactive", "batch")
        ]
        return [
            see,
            *intake,
            Acl("topic", settings.control_topic, "READ"),
            Acl("topic", settings.events_topic, "READ"),  # a re-run reads the request's earlier events
            Acl("topic", settings.events_topic, "WRITE"),
            Acl("topic", settings.models_topic, "WRITE"),
            Acl("topic", settings.dlq_topic, "WRITE"),
            *(Acl("group", settings.worker_group_for(m), "READ") for m in models),
        ]
    if role in ("gateway", "producer"):
        submit = [
            Acl("topic", settings.topic("requests."), "WRITE", prefixed=True),
            Acl("topic", settings.topic("batch."), "WRITE", prefixed=True),
            # requests.dlq starts like a requests topic: a deny outranks the prefixed allow.
            Acl("topic", settings.dlq_topic, "WRITE", deny=True),
        ]
        if role == "producer":
            return [see, *submit]
        return [
            see,
            *submit,
            Acl("topic", settings.control_topic, "WRITE"),
            Acl("topic", settings.events_topic, "WRITE"),  # Accepted, and Failed for a request it refuses
            Acl("topic", settings.events_topic, "READ"),
            Acl("topic", settings.models_topic, "READ"),
            Acl("group", settings.gateway_group, "READ"),
            # The request backlog: the workers' committed offsets.
            Acl("group", settings.topic("workers."), "DESCRIBE", prefixed=True),
        ]
    if role == "analytics":
        app = f"{p}analytics"  # services.analytics.app.app_id: its group and its changelog topics' prefix
        return [
            see,
            Acl("topic", settings.events_topic, "READ"),
            Acl("topic", app, "ALL", prefixed=True),
            Acl("group", app, "READ"),
        ]
    if role == "registry":
        return [
            see,
            Acl("topic", f"{p}schemas", "ALL", prefixed=True),
            Acl("group", REGISTRY_GROUP_PREFIX, "READ", prefixed=True),
        ]
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def acl_commands(settings: Settings, principals: Mapping[str, str], models: Sequence[str]) -> list[str]:
    """Every role's ACLs as ``kafka-acls.sh`` lines; ``principals`` maps role → principal (``User:name``)."""
    lines = []
    for role in ROLES:
        principal = principals.get(role, f"User:{role}")
        lines.append(f"# {role} ({principal})")
        lines += [acl.command(principal) for acl in role_acls(settings, role, models)]
    return lines


def bindings(settings: Settings, principals: Mapping[str, str], models: Sequence[str]) -> list[object]:
    """confluent-kafka AclBindings of every role."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    found: list[object] = []
    for role in ROLES:
        principal = principals.get(role, f"User:{role}")
        for acl in role_acls(settings, role, models):
            found.append(
                AclBinding(
                    ResourceType[acl.resource.upper()],
                    acl.name,
                    ResourcePatternType.PREFIXED if acl.prefixed else ResourcePatternType.LITERAL,
                    principal,
                    "*",
                    AclOperation[acl.operation],
                    AclPermissionType.DENY if acl.deny else AclPermissionType.ALLOW,
                )
            )
    return found


def apply_acls(
    admin_settings: Settings, principals: Mapping[str, str], models: Iterable[str], timeout_s: float = 30.0
) -> int:
    """Create every role's ACLs with the admin principal of ``admin_settings``; returns how many (idempotent)."""
    from services.kafka_auth import confluent_admin

    client = confluent_admin(admin_settings)
    wanted = bindings(admin_settings, principals, list(models))
    futures = client.create_acls(wanted, request_timeout=timeout_s)
    for binding, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:
            raise KafkaUnavailable(f"cannot create ACL {binding}: {exc}", retriable=False) from exc
    log.info("created %d ACLs for roles %s", len(wanted), ", ".join(ROLES))
    return len(wanted)

"""The secure broker of the tests (SASL_SSL, SCRAM, ACLs on): its bootstrap, its users, each component as its role."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from services.local.broker.runner import LocalBroker
from services.local.broker.secure import ADMIN, client_fields
from services.settings import Settings


class SecureBootstrap(str):
    """A bootstrap address that also knows its secure broker: what ``kafka_bootstrap`` yields when parametrised
    ``secure``, so the tests' own code stays the same for both brokers."""

    broker: LocalBroker

    @classmethod
    def of(cls, broker: LocalBroker) -> SecureBootstrap:
        made = cls(broker.bootstrap)
        made.broker = broker
        return made


def security(bootstrap: str) -> dict[str, str]:
    """Settings fields of the admin user for a secure bootstrap; none for a plain one."""
    if not isinstance(bootstrap, SecureBootstrap):
        return {}
    files = bootstrap.broker.files
    assert files is not None
    return client_fields(files, ADMIN, bootstrap.broker.passwords[ADMIN])


def secured(settings: Settings) -> Settings:
    """``settings`` (made with ``security()`` for a secure bootstrap), every role's ACLs granted for its prefix."""
    bootstrap = settings.kafka_bootstrap
    if not isinstance(bootstrap, SecureBootstrap):
        return settings
    bootstrap.broker.grant_roles(settings)
    return dataclasses.replace(settings, kafka_bootstrap=str(bootstrap))


def as_role(settings: Settings, role: str) -> Settings:
    """``settings`` connecting as ``role`` when they connect to a secure broker (the users sit beside the CA)."""
    if settings.kafka_security_protocol.upper() == "PLAINTEXT" or not settings.kafka_ssl_ca_file:
        return settings
    passwords = json.loads((Path(settings.kafka_ssl_ca_file).parent / "credentials.json").read_text())
    return dataclasses.replace(settings, kafka_sasl_username=role, kafka_sasl_password=passwords[role])


# Modules or tests that also run against the secure broker: `@SECURE_TOO` (or in pytestmark).
SECURE_TOO = pytest.mark.parametrize("kafka_bootstrap", ["plain", "secure"], indirect=True)

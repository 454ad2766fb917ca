"""The Kafka security settings as each client library spells them: aiokafka, faust, librdkafka, Java clients."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import shlex
import ssl
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka.abc import AbstractTokenProvider

from schemas.errors import ConfigError
from services.settings import Settings

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

TOKEN_COMMAND_TIMEOUT_S = 30.0
# When a token says nothing of its expiry, librdkafka asks again after this long.
DEFAULT_TOKEN_LIFETIME_S = 300
# Apicurio's KafkaSQL storage hands every property under this prefix to its producer, consumer and admin client.
APICURIO_KAFKA_PREFIX = "apicurio.kafka.common."
JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "OAUTHBEARER": "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule",
}


def protocol(settings: Settings) -> str:
    return settings.kafka_security_protocol.upper()


def mechanism(settings: Settings) -> str:
    return settings.kafka_sasl_mechanism.upper()


def uses_tls(settings: Settings) -> bool:
    return protocol(settings) in ("SSL", "SASL_SSL")


def uses_sasl(settings: Settings) -> bool:
    return protocol(settings) in ("SASL_PLAINTEXT", "SASL_SSL")


# ---------------------------------------------------------------------------------------------- tokens


def read_token(settings: Settings) -> str:
    """The current OAUTHBEARER token: the token file's content or the token command's output, stripped."""
    if settings.kafka_sasl_oauth_token_file:
        path = Path(settings.kafka_sasl_oauth_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_FILE={path}: cannot read it ({exc})") from exc
    else:
        command = settings.kafka_sasl_oauth_token_command
        try:
            done = subprocess.run(
                shlex.split(command), capture_output=True, text=True, timeout=TOKEN_COMMAND_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_COMMAND failed: {exc}") from exc
        if done.returncode != 0:
            raise ConfigError(
                f"TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_COMMAND exited with {done.returncode}: {done.stderr.strip()[:200]}"
            )
        token = done.stdout.strip()
    if not token:
        raise ConfigError("the OAUTHBEARER token is empty (TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_FILE / _COMMAND)")
    return token


def token_expiry(token: str, now: float) -> float:
    """When a JWT expires (its ``exp`` claim, seconds since the epoch); ``now`` plus a default for other tokens."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            exp = claims.get("exp") if isinstance(claims, dict) else None
            if isinstance(exp, int | float):
                return float(exp)
        except ValueError:
            pass
    return now + DEFAULT_TOKEN_LIFETIME_S


class TokenProvider(AbstractTokenProvider):
    """aiokafka's OAUTHBEARER token source: the file or command of the settings, read at each authentication."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def token(self) -> str:
        return await asyncio.to_thread(read_token, self.settings)


def librdkafka_oauth_cb(settings: Settings) -> Any:
    """confluent-kafka's ``oauth_cb``: returns (token, expiry in seconds since the epoch)."""

    def oauth_cb(_config: object) -> tuple[str, float]:
        token = read_token(settings)
        return token, token_expiry(token, time.time())

    return oauth_cb


# ---------------------------------------------------------------------------------------------- per library


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the Python clients (None without TLS); ConfigError naming the variable of a bad file."""
    if not uses_tls(settings):
        return None
    return _ssl_context(
        settings.kafka_ssl_ca_file,
        settings.kafka_ssl_cert_file,
        settings.kafka_ssl_key_file,
        settings.kafka_ssl_key_password,
        settings.kafka_ssl_check_hostname,
    )


@functools.lru_cache(maxsize=16)
def _ssl_context(
    ca_file: str, cert_file: str, key_file: str, key_password: str, check_hostname: bool
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TOKENRELAY_KAFKA_SSL_CA_FILE={ca_file}: not a readable PEM CA file ({exc})") from exc
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file, key_password or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"TOKENRELAY_KAFKA_SSL_CERT_FILE={cert_file} / TOKENRELAY_KAFKA_SSL_KEY_FILE={key_file}: "
                f"cannot load the client certificate ({exc})"
            ) from exc
    context.check_hostname = check_hostname
    return context


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
    options: dict[str, Any] = {"security_protocol": protocol(settings)}
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if uses_sasl(settings):
        options["sasl_mechanism"] = mechanism(settings)
        if mechanism(settings) == "OAUTHBEARER":
            options["sasl_oauth_token_provider"] = TokenProvider(settings)
        else:
            options["sasl_plain_username"] = settings.kafka_sasl_username
            options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """faust's ``broker_credentials`` (None for PLAINTEXT)."""
    from faust import OAuthCredentials, SASLCredentials, SSLCredentials

    context = ssl_context(settings)
    if uses_sasl(settings):
        if mechanism(settings) == "OAUTHBEARER":
            return OAuthCredentials(oauth_cb=TokenProvider(settings), ssl_context=context)
        return SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            ssl_context=context,
            mechanism=mechanism(settings),
        )
    if context is not None:
        return SSLCredentials(context)
    return None


def librdkafka_config(settings: Settings) -> dict[str, Any]:
    """confluent-kafka (librdkafka) configuration keys."""
    config: dict[str, Any] = {"security.protocol": protocol(settings)}
    if uses_tls(settings):
        # "probe": the system's CA store, which the wheels' own OpenSSL would not look in by itself.
        config["ssl.ca.location"] = settings.kafka_ssl_ca_file or "probe"
        if settings.kafka_ssl_cert_file:
            config["ssl.certificate.location"] = settings.kafka_ssl_cert_file
            config["ssl.key.location"] = settings.kafka_ssl_key_file
        if settings.kafka_ssl_key_password:
            config["ssl.key.password"] = settings.kafka_ssl_key_password
        config["ssl.endpoint.identification.algorithm"] = "https" if settings.kafka_ssl_check_hostname else "none"
    if uses_sasl(settings):
        config["sasl.mechanism"] = mechanism(settings)
        if mechanism(settings) == "OAUTHBEARER":
            config["oauth_cb"] = librdkafka_oauth_cb(settings)
        else:
            config["sasl.username"] = settings.kafka_sasl_username
            config["sasl.password"] = settings.kafka_sasl_password
    return config


def confluent_admin(settings: Settings) -> Any:
    """A confluent-kafka AdminClient for ``settings``; librdkafka's own log lines (every refused connection while a
    broker starts) go to a logger that stays off the console."""
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("tokenrelay.librdkafka")
    quiet.propagate = False
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap, "logger": quiet}
    return AdminClient({**conf, **librdkafka_config(settings)})


def java_client_properties(settings: Settings) -> dict[str, str]:
    """Java client properties (kafka tools' --command-config, the registry's storage); secrets included."""
    props = {"security.protocol": protocol(settings)}
    if uses_tls(settings):
        if settings.kafka_ssl_ca_file:
            props["ssl.truststore.type"] = "PEM"
            props["ssl.truststore.location"] = settings.kafka_ssl_ca_file
        if settings.kafka_ssl_cert_file:
            # A PEM keystore file must hold key and chain together; given inline, the two files stay as they are.
            props["ssl.keystore.type"] = "PEM"
            props["ssl.keystore.certificate.chain"] = _read(
                settings.kafka_ssl_cert_file, "TOKENRELAY_KAFKA_SSL_CERT_FILE"
            )
            props["ssl.keystore.key"] = _read(settings.kafka_ssl_key_file, "TOKENRELAY_KAFKA_SSL_KEY_FILE")
            if settings.kafka_ssl_key_password:
                props["ssl.key.password"] = settings.kafka_ssl_key_password
        # Explicit both ways: Apicurio's storage defaults it to "" (no host name check).
        props["ssl.endpoint.identification.algorithm"] = "https" if settings.kafka_ssl_check_hostname else ""
    if uses_sasl(settings):
        name = mechanism(settings)
        props["sasl.mechanism"] = name
        if name == "OAUTHBEARER":
            if not settings.kafka_sasl_oauth_token_file:
                raise ConfigError(
                    "the Java clients (the schema registry's storage, the Kafka tools) read an OAUTHBEARER token from "
                    "a file only: set TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_FILE"
                )
            token_url = Path(settings.kafka_sasl_oauth_token_file).expanduser().resolve().as_uri()
            props["sasl.login.callback.handler.class"] = (
                "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginCallbackHandler"
            )
            props["sasl.oauthbearer.token.endpoint.url"] = token_url
            props["sasl.jaas.config"] = f"{JAAS_MODULES[name]} required ;"
        else:
            user, password = (_jaas_quote(v) for v in (settings.kafka_sasl_username, settings.kafka_sasl_password))
            props["sasl.jaas.config"] = f'{JAAS_MODULES[name]} required username="{user}" password="{password}";'
    return props


def apicurio_properties(settings: Settings) -> dict[str, str]:
    """The Java client properties as Apicurio Registry's KafkaSQL storage takes them (one prefix for all clients)."""
    return {APICURIO_KAFKA_PREFIX + key: value for key, value in java_client_properties(settings).items()}


def _jaas_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _read(path: str, env: str) -> str:
    try:
        return Path(path).expanduser().read_text()
    except OSError as exc:
        raise ConfigError(f"{env}={path}: cannot read it ({exc})") from exc

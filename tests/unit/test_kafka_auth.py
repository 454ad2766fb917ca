"""The Kafka security settings as each client library spells them, and the roles' ACLs."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from services import kafka_auth
from services.acls import ROLES, acl_commands, role_acls
from services.local.broker import secure
from services.settings import Settings, effective_table, sources


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> secure.SecureFiles:
    files = secure.SecureFiles(tmp_path_factory.mktemp("pki"))
    secure.ensure_material(files)
    return files


def scram(files: secure.SecureFiles, **more: object) -> Settings:
    return Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_ssl_ca_file=str(files.ca_cert),
        kafka_sasl_username="gateway",
        kafka_sasl_password='p"w\\d',
        **more,  # type: ignore[arg-type]
    )


def test_plaintext_maps_to_nothing_but_the_protocol() -> None:
    s = Settings()
    assert kafka_auth.aiokafka_options(s) == {"security_protocol": "PLAINTEXT"}
    assert kafka_auth.librdkafka_config(s) == {"security.protocol": "PLAINTEXT"}
    assert kafka_auth.java_client_properties(s) == {"security.protocol": "PLAINTEXT"}
    assert kafka_auth.faust_credentials(s) is None


def test_sasl_ssl_scram_for_every_library(material: secure.SecureFiles) -> None:
    s = scram(material)
    aio = kafka_auth.aiokafka_options(s)
    assert aio["security_protocol"] == "SASL_SSL" and aio["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (aio["sasl_plain_username"], aio["sasl_plain_password"]) == ("gateway", 'p"w\\d')
    assert isinstance(aio["ssl_context"], ssl.SSLContext) and aio["ssl_context"].check_hostname
    rd = kafka_auth.librdkafka_config(s)
    assert rd == {
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(material.ca_cert),
        "ssl.endpoint.identification.algorithm": "https",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "gateway",
        "sasl.password": 'p"w\\d',
    }
    java = kafka_auth.java_client_properties(s)
    assert java["ssl.truststore.type"] == "PEM" and java["ssl.truststore.location"] == str(material.ca_cert)
    assert java["sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="gateway" password="p\\"w\\\\d";'
    )
    assert kafka_auth.apicurio_properties(s)["apicurio.kafka.common.security.protocol"] == "SASL_SSL"
    creds = kafka_auth.faust_credentials(s)
    assert type(creds).__name__ == "SASLCredentials"
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.protocol.value == "SASL_SSL"  # type: ignore[union-attr]


def test_mutual_tls_loads_the_client_certificate(material: secure.SecureFiles, tmp_path: Path) -> None:
    # The broker's key and certificate serve as a client pair here: what matters is that each library gets them.
    pem = material.broker_keystore.read_text()
    key = pem[: pem.index("-----END PRIVATE KEY-----") + len("-----END PRIVATE KEY-----\n")]
    (tmp_path / "key.pem").write_text(key)
    (tmp_path / "cert.pem").write_text(pem[len(key) :])
    s = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_file=str(material.ca_cert),
        kafka_ssl_cert_file=str(tmp_path / "cert.pem"),
        kafka_ssl_key_file=str(tmp_path / "key.pem"),
        kafka_ssl_check_hostname=False,
    )
    assert not kafka_auth.aiokafka_options(s)["ssl_context"].check_hostname
    rd = kafka_auth.librdkafka_config(s)
    assert rd["ssl.certificate.location"] == str(tmp_path / "cert.pem") and rd["ssl.key.location"].endswith("key.pem")
    assert rd["ssl.endpoint.identification.algorithm"] == "none"
    assert kafka_auth.librdkafka_config(Settings(kafka_security_protocol="SSL"))["ssl.ca.location"] == "probe"
    java = kafka_auth.java_client_properties(s)
    assert java["ssl.keystore.type"] == "PEM" and "BEGIN PRIVATE KEY" in java["ssl.keystore.key"]
    assert java["ssl.endpoint.identification.algorithm"] == ""
    assert type(kafka_auth.faust_credentials(s)).__name__ == "SSLCredentials"


def test_a_bad_ca_file_names_its_variable(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    s = Settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="TOKENRELAY_KAFKA_SSL_CA_FILE"):
        kafka_auth.aiokafka_options(s)


def jwt(exp: int) -> str:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode().rstrip("=")
    return f"e30.{claims}.sig"


async def test_oauthbearer_token_from_a_file_and_from_a_command(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(jwt(2_000_000_000) + "\n")
    by_file = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="OAUTHBEARER",
        kafka_sasl_oauth_token_file=str(tmp_path / "token"),
    )
    provider = kafka_auth.aiokafka_options(by_file)["sasl_oauth_token_provider"]
    assert await provider.token() == jwt(2_000_000_000)
    assert kafka_auth.librdkafka_config(by_file)["oauth_cb"](None) == (jwt(2_000_000_000), 2_000_000_000.0)
    java = kafka_auth.java_client_properties(by_file)
    assert java["sasl.oauthbearer.token.endpoint.url"] == (tmp_path / "token").resolve().as_uri()
    by_command = Settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="oauthbearer",
        kafka_sasl_oauth_token_command="echo opaque-token",
    )
    assert await kafka_auth.aiokafka_options(by_command)["sasl_oauth_token_provider"].token() == "opaque-token"
    assert kafka_auth.token_expiry("opaque-token", 100.0) == 100.0 + kafka_auth.DEFAULT_TOKEN_LIFETIME_S
    assert type(kafka_auth.faust_credentials(by_command)).__name__ == "OAuthCredentials"
    with pytest.raises(ConfigError, match="TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_FILE"):
        kafka_auth.java_client_properties(by_command)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs TOKENRELAY_KAFKA_SASL_USERNAME"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "OAUTHBEARER"}, "exactly one of"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cert_file": "c.pem"}, "go together"),
        ({"kafka_ssl_cert_file": "c.pem", "kafka_ssl_key_file": "k.pem"}, "a client certificate needs TLS"),
        ({"kafka_security_protocol": "SASL_SSL_X"}, "TOKENRELAY_KAFKA_SECURITY_PROTOCOL"),
        ({"kafka_sasl_mechanism": "SCRAM-SHA-1"}, "TOKENRELAY_KAFKA_SASL_MECHANISM"),
    ],
)
def test_unusable_security_settings_are_config_errors(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings(**fields)  # type: ignore[arg-type]


def test_settings_shows_security_without_secrets(material: secure.SecureFiles) -> None:
    s = scram(material, kafka_ssl_key_password="k-secret", schema_registry_basic_auth="u:r-secret")
    table = effective_table(s, sources({}))
    assert "TOKENRELAY_KAFKA_SASL_USERNAME" in table and "gateway" in table
    for secret_value in ('p"w\\d', "k-secret", "r-secret"):
        assert secret_value not in table
    assert table.count("(set, hidden)") == 3


def test_roles_least_privilege() -> None:
    s = Settings()
    worker = role_acls(s, "worker", ["default"])
    reads = {a.name for a in worker if a.operation == "READ" and a.resource == "topic"}
    assert reads == {
        "tokenrelay.requests.default",
        "tokenrelay.batch.default",
        "tokenrelay.control",
        "tokenrelay.events",
    }
    producer = role_acls(s, "producer", ["default"])
    assert not any(a.resource == "group" for a in producer)
    assert {a.name for a in producer if a.operation == "WRITE" and not a.deny} == {
        "tokenrelay.requests.",
        "tokenrelay.batch.",
    }
    assert any(a.deny and a.name == "tokenrelay.requests.dlq" for a in producer)
    gateway_groups = {(a.name, a.operation) for a in role_acls(s, "gateway", ["default"]) if a.resource == "group"}
    assert gateway_groups == {("tokenrelay.gateways", "READ"), ("tokenrelay.workers.", "DESCRIBE")}
    analytics = role_acls(s, "analytics", ["default"])
    assert not any(a.name == "tokenrelay.events" and a.operation == "WRITE" for a in analytics)
    lines = acl_commands(s, {}, ["default"])
    assert sum(line.startswith("# ") for line in lines) == len(ROLES)
    assert "--deny-principal User:producer --operation Write --topic 'tokenrelay.requests.dlq'" in "\n".join(lines)


def test_secure_broker_properties(material: secure.SecureFiles) -> None:
    passwords = json.loads(material.credentials.read_text())
    assert set(passwords) == set(secure.USERS)
    assert oct(material.credentials.stat().st_mode & 0o777) == "0o600"
    assert oct(material.broker_keystore.stat().st_mode & 0o777) == "0o600"
    props = secure.server_properties(material, passwords, 9092, 9093)
    assert props["listeners"] == "SASL_SSL://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["super.users"] == "User:admin;User:CN=tokenrelay-broker"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    args = secure.scram_arguments(passwords)
    assert f"--add-scram=SCRAM-SHA-512=[name=producer,password={passwords['producer']}]" in args
    assert secure.ensure_material(material) == passwords  # a restart keeps users and certificates


def test_secure_broker_prints_the_admins_settings_and_writes_java_client_files(material: secure.SecureFiles) -> None:
    from services.local.broker.config import parse_properties
    from services.local.broker.runner import secure_ready_lines

    passwords = json.loads(material.credentials.read_text())
    lines = secure_ready_lines(material, passwords)
    assert "export TOKENRELAY_KAFKA_SECURITY_PROTOCOL=SASL_SSL" in lines
    assert f"export TOKENRELAY_KAFKA_SASL_PASSWORD={passwords['admin']}" in lines
    assert sum(f"TOKENRELAY_KAFKA_SASL_USERNAME={role} " in line for line in lines for role in ROLES) == len(ROLES)
    java = parse_properties(material.client_properties("gateway").read_text())
    assert java["security.protocol"] == "SASL_SSL" and java["ssl.truststore.location"] == str(material.ca_cert)
    assert f'username="gateway" password="{passwords["gateway"]}"' in java["sasl.jaas.config"]
    assert oct(material.client_properties("gateway").stat().st_mode & 0o777) == "0o600"

"""A secure local broker's material: a CA and broker certificate, SCRAM users per role, the listener properties."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.acls import ROLES
from services.local.broker.config import HOST
from services.settings import Settings

MECHANISM = "SCRAM-SHA-512"
ADMIN = "admin"
BROKER_CN = "tokenrelay-broker"
# The brokers and controllers authenticate to each other's controller listener with the broker certificate.
BROKER_PRINCIPAL = f"User:CN={BROKER_CN}"
CERT_DAYS = 825
USERS = (ADMIN, *ROLES)


@dataclass(frozen=True, slots=True)
class SecureFiles:
    """Where a secure broker keeps its material (``<data dir>/security``; keys and passwords readable by the owner
    only)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def broker_keystore(self) -> Path:
        """The broker's PKCS#8 key followed by its certificate chain: a PEM keystore."""
        return self.directory / "broker.pem"

    @property
    def credentials(self) -> Path:
        return self.directory / "credentials.json"

    def client_properties(self, user: str) -> Path:
        return self.directory / f"{user}.properties"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def ensure_material(files: SecureFiles) -> dict[str, str]:
    """Create what is missing (CA, broker certificate for 127.0.0.1/localhost, a password per user); returns the
    passwords by user. Existing files are kept, so restarts keep certificates and users."""
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o700)
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        _write_ca(files)
    if not files.broker_keystore.exists():
        _write_broker_cert(files)
    if files.credentials.exists():
        passwords: dict[str, str] = json.loads(files.credentials.read_text())
    else:
        passwords = {}
    missing = [user for user in USERS if user not in passwords]
    if missing:
        passwords.update({user: secrets.token_urlsafe(24) for user in missing})
        _write_private(files.credentials, json.dumps(passwords, indent=2).encode())
    return passwords


def _write_ca(files: SecureFiles) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenrelay local CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    _write_private(
        files.ca_key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_broker_cert(files: SecureFiles) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BROKER_CN)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Server towards clients, client towards the other nodes' controller listeners.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pem += cert.public_bytes(serialization.Encoding.PEM) + files.ca_cert.read_bytes()
    _write_private(files.broker_keystore, pem)


def server_properties(
    files: SecureFiles, passwords: Mapping[str, str], port: int, controller_port: int
) -> dict[str, str]:
    """The keys that turn a local node's plain listeners into SASL_SSL (SCRAM-SHA-512) for clients and the brokers,
    mutual TLS between controllers, and ACLs on (StandardAuthorizer: nothing is allowed without one)."""
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN}" password="{passwords[ADMIN]}";'
    )
    return {
        "listeners": f"SASL_SSL://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"SASL_SSL://{HOST}:{port}",
        "inter.broker.listener.name": "SASL_SSL",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(files.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(files.ca_cert),
        "listener.name.controller.ssl.client.auth": "required",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN};{BROKER_PRINCIPAL}",
        "allow.everyone.if.no.acl.found": "false",
    }


def scram_arguments(passwords: Mapping[str, str]) -> list[str]:
    """StorageTool ``format`` arguments that create every user's SCRAM credential in the bootstrap metadata."""
    return [f"--add-scram={MECHANISM}=[name={user},password={passwords[user]}]" for user in USERS]


def client_settings(base: Settings, files: SecureFiles, passwords: Mapping[str, str], user: str) -> Settings:
    """``base`` connecting as ``user`` over SASL_SSL."""
    return dataclasses.replace(base, **client_fields(files, user, passwords[user]))  # type: ignore[arg-type]


def client_fields(files: SecureFiles, user: str, password: str) -> dict[str, str]:
    return {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": MECHANISM,
        "kafka_ssl_ca_file": str(files.ca_cert),
        "kafka_sasl_username": user,
        "kafka_sasl_password": password,
    }


def env_lines(files: SecureFiles, user: str, password: str) -> list[str]:
    """``export TOKENRELAY_…`` lines of a client connecting as ``user``."""
    env = {
        "kafka_security_protocol": "TOKENRELAY_KAFKA_SECURITY_PROTOCOL",
        "kafka_sasl_mechanism": "TOKENRELAY_KAFKA_SASL_MECHANISM",
        "kafka_ssl_ca_file": "TOKENRELAY_KAFKA_SSL_CA_FILE",
        "kafka_sasl_username": "TOKENRELAY_KAFKA_SASL_USERNAME",
        "kafka_sasl_password": "TOKENRELAY_KAFKA_SASL_PASSWORD",
    }
    return [f"export {env[name]}={value}" for name, value in client_fields(files, user, password).items()]

"""Fixtures that find a real Kafka broker: TOKENRELAY_TEST_KAFKA, else testcontainers, else the local runner."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.errors import BrokerError, MissingToolError
from services.local.broker.runner import LocalBroker, ensure_jars, free_port, java_binary, metadata_ready
from services.settings import Settings
from tests.integration.brokers import LocalBrokerFactory
from tests.integration.cluster_support import ClusterProcess
from tests.integration.secure_support import SecureBootstrap

log = logging.getLogger(__name__)

KAFKA_IMAGE = os.environ.get("TOKENRELAY_TEST_KAFKA_IMAGE", "apache/kafka:4.1.2")
CONTAINER_START_TIMEOUT_S = 120.0


def _docker_answers() -> bool:
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False
    # docker-py leaks its unix socket when connect() fails (an engine that is down); keep that ResourceWarning
    # from failing the session under filterwarnings=error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@contextlib.contextmanager
def _kafka_container() -> Iterator[str]:
    """A single-node KRaft broker from the official apache/kafka image."""
    # testcontainers' KafkaContainer drives Confluent's cp-kafka start scripts, which the apache/kafka image lacks;
    # a plain container configured through the image's KAFKA_* variables is what works with it.
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(KAFKA_IMAGE)
    host = container.get_docker_client().host()
    # Kafka must advertise the address clients use, so the host port is chosen before the container starts.
    host_port = free_port()
    inner_port = 19092
    container.with_bind_ports(inner_port, host_port)
    container.with_envs(
        CLUSTER_ID="4L6g3nShT-eMCtK--X86sw",
        KAFKA_NODE_ID="1",
        KAFKA_PROCESS_ROLES="broker,controller",
        KAFKA_LISTENERS=f"PLAINTEXT://0.0.0.0:{inner_port},CONTROLLER://127.0.0.1:9093",
        KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://{host}:{host_port}",
        KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        KAFKA_CONTROLLER_QUORUM_VOTERS="1@127.0.0.1:9093",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="1",
        KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
        KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS="1",
        KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
        KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
        KAFKA_NUM_PARTITIONS="1",
    )
    container.start()
    try:
        deadline = time.monotonic() + CONTAINER_START_TIMEOUT_S
        while not metadata_ready(host, host_port):
            if time.monotonic() > deadline:
                _, stderr = container.get_logs()
                raise BrokerError(f"{KAFKA_IMAGE} did not answer metadata on {host}:{host_port}\n{stderr[-4000:]!r}")
            time.sleep(0.2)
        yield f"{host}:{host_port}"
    finally:
        container.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """Bootstrap address of a Kafka broker shared by the whole test session: the plain one, or (parametrised
    ``secure``, see secure_support.SECURE_TOO) the secure one as a SecureBootstrap."""
    kind = getattr(request, "param", "plain")
    if kind not in ("plain", "secure"):
        raise ValueError(f"kafka_bootstrap is 'plain' or 'secure', not {kind!r}")
    bootstrap: str = request.getfixturevalue(f"{kind}_kafka_bootstrap")
    return bootstrap


@pytest.fixture(scope="session")
def secure_kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBootstrap]:
    """`tokenrelay broker --secure` for the session: SASL_SSL with a SCRAM user per role, ACLs on."""
    try:
        java_binary()
        ensure_jars(Settings.from_env(), quiet=True)
    except MissingToolError as exc:
        pytest.skip(f"the secure broker needs Java and Maven: {exc.message}")
    broker = LocalBroker(Settings.from_env(), 0, tmp_path_factory.mktemp("kafka-secure"), console=False, secure=True)
    try:
        broker.start()
        yield SecureBootstrap.of(broker)
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def plain_kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of the plain Kafka broker shared by the whole test session."""
    address = os.environ.get("TOKENRELAY_TEST_KAFKA", "").strip()
    if address:
        yield address
        return
    if _docker_answers():
        with _kafka_container() as bootstrap:
            yield bootstrap
        return
    broker = LocalBroker(Settings.from_env(), 0, tmp_path_factory.mktemp("kafka"), console=False)
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    """`tokenrelay broker --nodes 3` for one module: three KRaft nodes that restart when killed.

    Only the cluster tests (marked slow) ask for it; three JVMs are heavy on a small machine, so they stop when
    that module ends rather than weigh on every later test of the session.
    """
    try:
        java_binary()
        ensure_jars(Settings.from_env(), quiet=True)
    except MissingToolError as exc:
        pytest.skip(f"the cluster tests run `tokenrelay broker --nodes 3`, which needs Java and Maven: {exc.message}")
    cluster = ClusterProcess(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def local_broker_factory(tmp_path: Path) -> Iterator[LocalBrokerFactory]:
    """Makes separate, not yet started LocalBrokers (default: any free port, a fresh data dir); stops them all."""
    brokers: list[LocalBroker] = []

    def make(data_dir: Path | None = None, port: int = 0) -> LocalBroker:
        directory = data_dir or tmp_path / f"broker{len(brokers)}"
        broker = LocalBroker(Settings.from_env(), port, directory, console=False)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A prefix that makes this test's topic names unique on a shared broker."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture(scope="session")
def schema_registry_url(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Confluent-compatible URL of a schema registry shared by the session: TOKENRELAY_TEST_SCHEMA_REGISTRY, else the
    embedded Apicurio started once on the test broker (about a minute; only sessions that ask for it pay)."""
    address = os.environ.get("TOKENRELAY_TEST_SCHEMA_REGISTRY", "").strip()
    if address:
        yield address
        return
    from schemas.errors import MissingToolError
    from services.local.registry.runner import LocalRegistry, java_binary

    try:
        java_binary()
    except MissingToolError as exc:
        pytest.skip(f"no Java 21+ for the embedded schema registry: {exc.message}")
    settings = Settings.from_env(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:8]}.registry.")
    registry = LocalRegistry(settings, 0, log_dir=tmp_path_factory.mktemp("registry"))
    try:
        yield registry.start()
    finally:
        registry.stop()

"""Integration tests of the local Kafka broker runner: readiness, durability across restarts, no orphan JVMs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.errors import BrokerError
from services.local.broker.cluster import free_port_block
from services.local.broker.runner import metadata_ready
from tests.integration.brokers import LocalBrokerFactory

pytestmark = pytest.mark.integration

PARTITIONS = 3


async def create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, count: int) -> dict[int, list[bytes]]:
    """Send ``count`` records with acks=all; returns the acknowledged values per partition, in offset order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=f"record-{i}".encode(), key=str(i).encode()) for i in range(count)]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    acked: dict[int, list[tuple[int, bytes]]] = {}
    for i, record in enumerate(metadata):
        acked.setdefault(record.partition, []).append((record.offset, f"record-{i}".encode()))
    return {p: [value for _, value in sorted(rows)] for p, rows in acked.items()}


async def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> dict[int, list[bytes]]:
    """Read every partition of ``topic`` from the beginning until ``expected`` records arrived."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        got: dict[int, list[bytes]] = {}
        deadline = time.monotonic() + timeout_s
        while sum(map(len, got.values())) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                got.setdefault(tp.partition, []).extend(r.value for r in records if r.value is not None)
        return got
    finally:
        await consumer.stop()


async def test_session_broker_round_trip(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}roundtrip"
    await create_topic(kafka_bootstrap, topic)
    acked = await produce(kafka_bootstrap, topic, 50)
    assert await consume_all(kafka_bootstrap, topic, 50) == acked


@pytest.mark.parametrize("how", ["sigterm", "jvm-crash"])
async def test_restart_keeps_acknowledged_records(
    local_broker_factory: LocalBrokerFactory, tmp_path: Path, topic_prefix: str, how: str
) -> None:
    port = free_port_block(1)  # restarted on it: below the ephemeral range
    broker = local_broker_factory(tmp_path / "data", port)
    bootstrap = await asyncio.to_thread(broker.start)
    topic = f"{topic_prefix}durable"
    await create_topic(bootstrap, topic)
    acked = await produce(bootstrap, topic, 1000)
    assert sum(map(len, acked.values())) == 1000

    if how == "sigterm":
        await asyncio.to_thread(broker.stop)
    else:
        # A crashed JVM: no controlled shutdown, so the restart has to recover the logs.
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGKILL)
        await asyncio.to_thread(broker.stop)

    assert not metadata_ready("127.0.0.1", port)
    again = await asyncio.to_thread(broker.start)
    assert again == bootstrap
    assert await consume_all(again, topic, 1000) == acked


async def test_busy_port_is_a_clear_error(local_broker_factory: LocalBrokerFactory) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        broker = local_broker_factory(port=port)
        with pytest.raises(BrokerError, match="already in use"):
            await asyncio.to_thread(broker.start)
    assert not broker.is_running()


@pytest.mark.slow
def test_no_orphan_jvm_when_python_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from services.local.broker.runner import LocalBroker
        from services.settings import Settings
        broker = LocalBroker(Settings.from_env(), 0, Path({str(tmp_path)!r}), console=False)
        broker.start()
        print(broker.pid, flush=True)
        time.sleep(600)
        """
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root, env=env
    ) as child:
        try:
            assert child.stdout is not None
            jvm_pid = int(child.stdout.readline())
            assert Path(f"/proc/{jvm_pid}").exists()
        finally:
            child.kill()
            child.wait()
    deadline = time.monotonic() + 30
    while _alive(jvm_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(jvm_pid), "the broker JVM outlived its SIGKILLed parent"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    # A zombie waits only to be reaped by init.
    return state != "Z"

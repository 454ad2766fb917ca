"""Broker cost of the token log on a three-node local cluster: events per broker CPU-second at RF 3 and RF 1."""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.support import load
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import Delta, TokenEvent
from services.kafka import make_consumer, make_producer, record_headers, start_client
from services.local.broker.cluster import LocalCluster
from services.settings import Settings

EVENTS = 100_000
STREAMS = 1_000  # events spread over this many request ids, one token each, as a worker writes them
PARTITIONS = 8
ROUNDS = 3


def _broker_cpu_s(cluster: LocalCluster) -> float:
    total = 0.0
    for node_id in cluster.nodes:
        pid = cluster.pid(node_id)
        if pid is not None:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def _log_bytes(data_dir: Path, topic: str) -> int:
    return sum(f.stat().st_size for f in data_dir.glob(f"node-*/logs/{topic}-*/*.log"))


async def _create(settings: Settings, topic: str, rf: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        config = {"min.insync.replicas": str(max(1, rf - 1)), "message.timestamp.type": "LogAppendTime"}
        await admin.create_topics([NewTopic(topic, PARTITIONS, rf, topic_configs=config)])
    finally:
        await admin.close()


async def _produce(settings: Settings, topic: str) -> None:
    codec = default_codec()
    ids = [new_request_id() for _ in range(STREAMS)]
    runs = [uuid.uuid4().hex for _ in range(STREAMS)]
    producer = make_producer(settings)
    await start_client(producer)
    try:
        pending = []
        for i in range(EVENTS):
            s = i % STREAMS
            event = TokenEvent(ids[s], runs[s], 1 + i // STREAMS, int(time.time() * 1000), Delta(" token", (1000 + s,)))
            pending.append(
                await producer.send(
                    topic, codec.encode(event), key=ids[s].encode(), headers=record_headers("TokenEvent")
                )
            )
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _read(settings: Settings, topic: str) -> None:
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        while seen < EVENTS:
            for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                seen += len(records)
    finally:
        await consumer.stop()


def run() -> dict[str, float]:
    """Interleaved RF 1 / RF 3 rounds on one three-node cluster; figures per broker CPU-second (all three JVMs)."""
    data_dir = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-cluster-"))
    cluster = LocalCluster(Settings.from_env(), 3, port=0, data_dir=data_dir, heap_mb=256, console=False)
    per_cpu: dict[int, list[float]] = {1: [], 3: []}
    read_share: list[float] = []
    disk: list[float] = []
    with cluster:
        settings = Settings.from_env({}, kafka_bootstrap=cluster.bootstrap)
        for rnd in range(ROUNDS):
            for rf in (1, 3):
                topic = f"bench-cluster.{rnd}.rf{rf}"
                asyncio.run(_create(settings, topic, rf))
                before = _broker_cpu_s(cluster)
                asyncio.run(_produce(settings, topic))
                produced = _broker_cpu_s(cluster)
                asyncio.run(_read(settings, topic))
                cpu = _broker_cpu_s(cluster) - before
                per_cpu[rf].append(EVENTS / cpu)
                if rf == 3:
                    read_share.append((before + cpu - produced) / cpu)
                    disk.append(_log_bytes(data_dir, topic) / 3 / EVENTS)
                print(f"  round {rnd} RF {rf}: broker CPU {cpu:.2f}s, load {load()}", file=sys.stderr)
    ratio = [a / b for a, b in zip(per_cpu[3], per_cpu[1], strict=True)]
    for name, values in (("RF 1", per_cpu[1]), ("RF 3, min ISR 2", per_cpu[3])):
        print(
            f"broker events per CPU-s (3 nodes, produce acks=all + one read), {name}: "
            f"min {min(values):,.0f} median {statistics.median(values):,.0f} max {max(values):,.0f}"
        )
    print(f"RF 3 / RF 1 events per CPU-s: median {statistics.median(ratio):.2f} (min {min(ratio):.2f})")
    print(f"share of the RF 3 broker CPU spent serving the read: median {statistics.median(read_share):.2f}")
    print(f"bytes per one-token event on disk, per replica: {statistics.median(disk):.0f}")
    return {
        "broker_events_per_cpu_s_rf3": statistics.median(per_cpu[3]),
        "broker_events_per_cpu_s_rf1": statistics.median(per_cpu[1]),
        "event_bytes_on_disk": statistics.median(disk),
        "broker_read_cpu_share_rf3": statistics.median(read_share),
    }


if __name__ == "__main__":
    print(run())

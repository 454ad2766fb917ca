"""Gateway read cost and scale-out: distinct events read per gateway CPU-second (nobody watching, and one subscriber
per request), and the total gateway CPU for the same events with three gateways against one.

``gateway_scaleout_ratio_3`` is the read alone (the same events, nobody watching: what every gateway paid in full
when each read everything); ``gateway_scaleout_ratio_3_watched`` adds one subscriber per request with the clients
spread evenly over the gateways, so two in three events also cross one gateway-to-gateway SSE hop.

Two stacks run side by side on one broker: one gateway, and three gateways in one group. Rounds alternate between
them (A/B interleaved) and every figure is CPU-seconds of the gateway processes (psutil), not wall time, so the
shared box does not decide the answer. Events come from a scripted producer (no worker, no model).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import subprocess
import time
from dataclasses import dataclass

import psutil

from bench.support import (
    StreamSpec,
    bench_settings,
    bootstrap_from_env,
    gateway_metric,
    gather_results,
    load,
    raise_fd_limit,
    spawn_clients,
    start_gateway,
    stop_process,
)
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from schemas.records import Delta, Finished, Started, TokenEvent, Usage
from services.kafka import make_producer, record_headers, start_client
from services.local.broker.runner import free_port
from services.settings import Settings

ROUNDS = int(os.environ.get("BENCH_SCALEOUT_ROUNDS", "3"))
PARTITIONS = 6
UNWATCHED_REQUESTS = int(os.environ.get("BENCH_SCALEOUT_UNWATCHED_REQUESTS", "2000"))
UNWATCHED_EVENTS = int(os.environ.get("BENCH_SCALEOUT_UNWATCHED_EVENTS", "150"))  # per request
WATCHED_REQUESTS = int(os.environ.get("BENCH_SCALEOUT_WATCHED_REQUESTS", "200"))
WATCHED_EVENTS = int(os.environ.get("BENCH_SCALEOUT_WATCHED_EVENTS", "150"))
CLIENT_PROCESSES = 2


@dataclass
class Stack:
    name: str
    settings: list[Settings]
    procs: list[subprocess.Popen[bytes]]

    @property
    def bases(self) -> list[str]:
        return [f"http://127.0.0.1:{s.gateway_port}" for s in self.settings]

    def cpu_s(self) -> float:
        total = 0.0
        for proc in self.procs:
            times = psutil.Process(proc.pid).cpu_times()
            total += times.user + times.system
        return total

    def read(self) -> float:
        return sum(gateway_metric(s.gateway_port, "tokenrelay_gateway_hub_events_total") for s in self.settings)

    def wait_idle(self, idle_cpu_s: float = 0.01, window_s: float = 0.5) -> None:
        """Until the stack's gateways spend (almost) no CPU for a moment: watched from outside, at no cost to them
        (polling their /metrics while measuring would be part of the measurement)."""
        last = self.cpu_s()
        while True:
            time.sleep(window_s)
            now = self.cpu_s()
            if now - last < idle_cpu_s:
                return
            last = now


def _start_stack(name: str, bootstrap: str, gateways: int) -> Stack:
    first = bench_settings(bootstrap, events_partitions=PARTITIONS, subscriber_buffer=4096)
    settings = [first] + [dataclasses.replace(first, gateway_port=free_port()) for _ in range(gateways - 1)]
    stack = Stack(name, settings, [])
    for s in settings:
        stack.procs.append(start_gateway(s))
    deadline = time.monotonic() + 120
    while True:  # until the group has spread every partition over all of them
        owned = [gateway_metric(s.gateway_port, "tokenrelay_gateway_owned_partitions") for s in settings]
        if sum(owned) == PARTITIONS and all(owned):
            return stack
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: partitions not shared: {owned}")
        time.sleep(0.2)


def _encoded(rids: list[str], n: int) -> list[tuple[bytes, bytes]]:
    """Started, n Deltas and Finished per request, round robin over the requests: (key, value) pairs."""
    codec = default_codec()
    now = int(time.time() * 1000)
    out = [
        (rid.encode(), codec.encode(TokenEvent(rid, "run", 0, now, Started("bench", "synthetic", 1, 0))))
        for rid in rids
    ]
    for i in range(1, n + 1):
        for rid in rids:
            out.append((rid.encode(), codec.encode(TokenEvent(rid, "run", i, now, Delta(f" t{i}", (i,))))))
    for rid in rids:
        out.append((rid.encode(), codec.encode(TokenEvent(rid, "run", n + 1, now, Finished("length", Usage(1, n))))))
    return out


async def _produce_paced(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """One record at a time, round robin over the requests: streams as clients see them, an event per write."""
    producer = make_producer(settings, linger_ms=1)
    await start_client(producer)
    headers = record_headers("TokenEvent")
    try:
        for key, value in records:
            await producer.send(settings.events_topic, value, key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


async def _produce(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """As fast as one Python process can: whole batches per partition (the offered load is a busy cluster's)."""
    producer = make_producer(settings, linger_ms=5, enable_idempotence=False, acks=1)
    await start_client(producer)
    headers = record_headers("TokenEvent")
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in records:
        by_partition.setdefault(partition_for_key(key.decode(), PARTITIONS), []).append((key, value))
    try:
        sent = []
        for partition, items in by_partition.items():
            batch = producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    sent.append(await producer.send_batch(batch, settings.events_topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            sent.append(await producer.send_batch(batch, settings.events_topic, partition=partition))
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def _unwatched(stack: Stack) -> tuple[int, float]:
    """(events, gateway CPU-seconds) to read one batch of events nobody watches, offered as fast as a producer can
    write them (read capacity: the gateways' fixed costs per fetch are spread over full batches)."""
    records = _encoded([new_request_id() for _ in range(UNWATCHED_REQUESTS)], UNWATCHED_EVENTS)
    before_read = stack.read()
    before = stack.cpu_s()
    asyncio.run(_produce(stack.settings[0], records))
    deadline = time.monotonic() + 300
    while True:
        stack.wait_idle()
        spent = stack.cpu_s() - before
        if stack.read() - before_read >= len(records):
            return len(records), spent
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stack.name}: read {stack.read() - before_read} of {len(records)}")


def _watched(stack: Stack) -> tuple[int, float]:
    """(events, gateway CPU-seconds) to deliver one batch with one subscriber per request, clients spread evenly
    over the stack's gateways (so with three, two in three follow their request from another gateway); events are
    produced one at a time, so each usually crosses every hop alone, as tokens of live streams do."""
    rids = [new_request_id() for _ in range(WATCHED_REQUESTS)]
    bases = stack.bases
    specs = [StreamSpec(f"{bases[i % len(bases)]}/v1/requests/{rid}/events") for i, rid in enumerate(rids)]
    records = _encoded(rids, WATCHED_EVENTS)
    clients = spawn_clients(specs, CLIENT_PROCESSES)
    before = stack.cpu_s()
    asyncio.run(_produce_paced(stack.settings[0], records))
    result = gather_results(clients)
    spent = stack.cpu_s() - before
    if result.done != len(rids) or result.events != len(rids) * WATCHED_EVENTS:
        raise RuntimeError(f"{stack.name}: {result.done} of {len(rids)} streams done, {result.events} token events")
    return len(records), spent


def _summary(values: list[float]) -> str:
    return f"min {min(values):,.2f} / median {statistics.median(values):,.2f} / max {max(values):,.2f}"


def run() -> dict[str, float]:
    raise_fd_limit()
    bootstrap = bootstrap_from_env()
    one = _start_stack("1 gateway", bootstrap, 1)
    three = _start_stack("3 gateways", bootstrap, 3)
    per_cpu: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {"unwatched": [], "watched": []}
    try:
        for r in range(ROUNDS):
            for kind, measure in (("unwatched", _unwatched), ("watched", _watched)):
                cost: dict[str, float] = {}
                for stack in (one, three) if r % 2 == 0 else (three, one):
                    events, cpu = measure(stack)
                    per_cpu.setdefault((stack.name, kind), []).append(events / cpu)
                    cost[stack.name] = cpu / events
                    print(
                        f"round {r + 1} {kind:9} {stack.name:10}: {events:,} events, {cpu:.2f} gateway CPU-s "
                        f"-> {events / cpu:,.0f} events/CPU-s; {load()}",
                        flush=True,
                    )
                ratios[kind].append(cost[three.name] / cost[one.name])
    finally:
        for stack in (one, three):
            for proc in stack.procs:
                stop_process(proc)
    for (name, kind), values in sorted(per_cpu.items()):
        print(f"{name:10} {kind:9} events per gateway CPU-s: {_summary(values)}")
    for kind, values in ratios.items():
        print(f"3 gateways / 1 gateway, CPU per event, {kind:9}: {_summary(values)}")
    return {
        "gateway_ingest_events_per_cpu_s": statistics.median(per_cpu[(one.name, "unwatched")]),
        "gateway_ingest_events_per_cpu_s_watched": statistics.median(per_cpu[(one.name, "watched")]),
        "gateway_scaleout_ratio_3": statistics.median(ratios["unwatched"]),
        "gateway_scaleout_ratio_3_watched": statistics.median(ratios["watched"]),
    }


if __name__ == "__main__":
    print(run())

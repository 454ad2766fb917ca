"""Fair service under a flood: interactive time to first token idle vs under a batch flood of 20x the batch
capacity, batch throughput alone vs with 10 % interactive load, preemptions per minute.

One worker process (the built-in model by default; BENCH_FAIR_ENGINE=synthetic for the pipeline alone, labelled so),
requests written straight to Kafka (`requests.<model>` for interactive, `batch.<model>` for batch), times read from
the events log: TTFT is the first Delta's ts_ms minus the request's created_ms (one machine, one clock; no gateway
hop). One decode step is the median time per output token of the batch runs under the flood. Throughput rounds
alternate alone / mixed (min / median / max of each).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from bench.support import bench_settings, bootstrap_from_env, load, pct, running, start_worker
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import Delta, Failed, Finished, InferenceRequest, Started
from services.kafka import make_consumer, make_producer, record_headers, start_client
from services.local.broker.runner import free_port
from services.settings import Settings

ENGINE = os.environ.get("BENCH_FAIR_ENGINE", "model")
SLOTS = int(os.environ.get("BENCH_FAIR_SLOTS", "32"))
BATCH_TOKENS = int(os.environ.get("BENCH_FAIR_BATCH_TOKENS", "128"))
CHAT_TOKENS = int(os.environ.get("BENCH_FAIR_CHAT_TOKENS", "8"))
PROBES = int(os.environ.get("BENCH_FAIR_PROBES", "40"))
FLOOD = int(os.environ.get("BENCH_FAIR_FLOOD", str(20 * SLOTS)))
ROUND_BATCH = int(os.environ.get("BENCH_FAIR_ROUND_BATCH", str(6 * SLOTS)))
ROUNDS = int(os.environ.get("BENCH_FAIR_ROUNDS", "3"))
INTERACTIVE_SHARE = 0.10  # of the tokens of a mixed round


@dataclass
class Seen:
    created_ms: int
    started_ms: int | None = None
    first_ms: int | None = None
    end_ms: int | None = None
    tokens: int = 0
    runs: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Log:
    """Reads the events topic from its end and keeps, per request submitted through it, what the log shows."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.seen: dict[str, Seen] = {}
        self.producer = make_producer(settings)
        self.consumer = make_consumer(settings)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Log:
        await start_client(self.producer)
        await start_client(self.consumer)
        tps = [TopicPartition(self.settings.events_topic, p) for p in range(self.settings.events_partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.consumer.stop()
        await self.producer.stop()

    async def submit(self, count: int, priority: str, max_tokens: int, prompt: str) -> list[str]:
        ids = []
        codec = default_codec()
        topic = self.settings.requests_topic_for(self.settings.served_model, priority)
        for i in range(count):
            rid = new_request_id()
            now = int(time.time() * 1000)
            # sampled (seeded): greedy text from these prompts reaches the end-of-sequence token after a few tokens
            request = InferenceRequest(rid, f"{prompt} {i}", max_tokens, seed=i, priority=priority)
            self.seen[rid] = Seen(now)
            headers = record_headers("InferenceRequest")
            await self.producer.send(topic, codec.encode(request), key=rid.encode(), headers=headers)
            ids.append(rid)
        await self.producer.flush()
        return ids

    async def wait(self, ids: Sequence[str], timeout_s: float = 900.0) -> None:
        await asyncio.wait_for(asyncio.gather(*(self.seen[i].done.wait() for i in ids)), timeout_s)

    async def _read(self) -> None:
        codec = default_codec()
        while True:
            for records in (await self.consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                for record in records:
                    event = codec.decode_event(record.value or b"")
                    seen = self.seen.get(event.request_id)
                    if seen is None:
                        continue
                    payload = event.payload
                    if isinstance(payload, Started):
                        seen.runs += 1
                        if seen.started_ms is None:
                            seen.started_ms = event.ts_ms
                    elif isinstance(payload, Delta):
                        seen.tokens += len(payload.token_ids)
                        if seen.first_ms is None and payload.token_ids:
                            seen.first_ms = event.ts_ms
                    elif isinstance(payload, Finished | Failed):
                        seen.end_ms = event.ts_ms
                        seen.done.set()


def ttfts(log: Log, ids: Sequence[str]) -> list[float]:
    return [(s.first_ms - s.created_ms) / 1000 for i in ids if (s := log.seen[i]).first_ms is not None]


def split_ms(log: Log, ids: Sequence[str]) -> str:
    """p50 / p99 of the two parts of TTFT: submission to Started (queue, admission) and Started to first token."""
    queue = [s.started_ms - s.created_ms for i in ids if (s := log.seen[i]).started_ms is not None]
    engine = [s.first_ms - s.started_ms for i in ids if (s := log.seen[i]).first_ms and s.started_ms]
    return (
        f"to Started p50 {pct(queue, 0.5):.0f} / p99 {pct(queue, 0.99):.0f} ms, "
        f"Started to first token p50 {pct(engine, 0.5):.0f} / p99 {pct(engine, 0.99):.0f} ms"
    )


def per_token_s(log: Log, ids: Sequence[str]) -> list[float]:
    out = []
    for i in ids:
        s = log.seen[i]
        if s.first_ms is not None and s.end_ms is not None and s.tokens > 1:
            out.append((s.end_ms - s.first_ms) / 1000 / (s.tokens - 1))
    return out


def throughput(log: Log, ids: Sequence[str]) -> float:
    """Tokens per second of these requests, from the first's submission to the last's end."""
    start = min(log.seen[i].created_ms for i in ids)
    end = max(log.seen[i].end_ms or 0 for i in ids)
    return sum(log.seen[i].tokens for i in ids) / max(1e-3, (end - start) / 1000)


def preemptions(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("num_preemptions_total"))


async def probe(log: Log, count: int, gap_s: float) -> list[str]:
    """Interactive requests one at a time (each after the previous ended), ``gap_s`` apart."""
    ids = []
    for _ in range(count):
        (rid,) = await log.submit(1, "interactive", CHAT_TOKENS, "hello, how are you")
        await log.wait([rid])
        ids.append(rid)
        await asyncio.sleep(gap_s)
    return ids


async def batch_round(
    log: Log, chat_gap_s: float | None, chat_class: str = "interactive"
) -> tuple[float, float, int, int]:
    """Batch tokens/s, wall seconds, batch tokens and interactive tokens of one round; with ``chat_gap_s``, a short
    request every so often (the gap comes from a round alone, so that their tokens are about INTERACTIVE_SHARE of the
    round's), in ``chat_class`` ("batch" for the control: the same work without classes or preemption)."""
    started = time.monotonic()
    batch = await log.submit(ROUND_BATCH, "batch", BATCH_TOKENS, "summarise the night's logs")
    pending = asyncio.ensure_future(log.wait(batch))
    chats: list[str] = []
    while chat_gap_s is not None and not pending.done():
        chats += await log.submit(1, chat_class, CHAT_TOKENS, "hi")
        await asyncio.wait({pending}, timeout=chat_gap_s)
    await pending
    await log.wait(chats)
    tokens = sum(log.seen[i].tokens for i in batch)
    return throughput(log, batch), time.monotonic() - started, tokens, sum(log.seen[i].tokens for i in chats)


def chat_gap_s(round_s: float, batch_tokens: int, chat_tokens: float) -> float:
    """Gap between interactive requests that makes their tokens INTERACTIVE_SHARE of a round like this one."""
    count = INTERACTIVE_SHARE * batch_tokens / (1 - INTERACTIVE_SHARE) / max(1.0, chat_tokens)
    return round_s / max(1.0, count)


async def measure(settings: Settings, metrics_port: int) -> dict[str, float]:
    async with Log(settings) as log:
        warm = await log.submit(4, "interactive", CHAT_TOKENS, "warm up")
        await log.wait(warm, timeout_s=600)
        idle = await probe(log, PROBES, 0.05)
        before = preemptions(metrics_port)
        flood_started = time.monotonic()
        flood = await log.submit(FLOOD, "batch", BATCH_TOKENS, "summarise the night's logs")
        under = await probe(log, PROBES, 0.2)
        probed_until = time.monotonic()
        preempted = preemptions(metrics_port) - before
        flood_waiting = sum(1 for i in flood if log.seen[i].first_ms is None)
        await log.wait(flood)
        flood_s = time.monotonic() - flood_started
        runs = sum(log.seen[i].runs for i in flood)
        alone: list[float] = []
        mixed: list[float] = []
        chat_tokens = statistics.mean(log.seen[i].tokens for i in idle)
        chat_share: list[float] = []
        control: list[float] = []
        for _ in range(ROUNDS):
            rate, round_s, batch_tokens, _ = await batch_round(log, None)
            alone.append(rate)
            gap = chat_gap_s(round_s, batch_tokens, chat_tokens)
            rate, _, batch_tokens, interactive = await batch_round(log, gap)
            mixed.append(rate)
            chat_share.append(interactive / max(1, batch_tokens))
            control.append((await batch_round(log, gap, "batch"))[0])
        idle_t, under_t = ttfts(log, idle), ttfts(log, under)
        split = (split_ms(log, idle), split_ms(log, under))
        step = statistics.median(per_token_s(log, flood))
    idle_p50, idle_p99 = pct(idle_t, 0.5), pct(idle_t, 0.99)
    under_p50, under_p99 = pct(under_t, 0.5), pct(under_t, 0.99)
    ratios = [m / a for m, a in zip(mixed, alone, strict=True)]
    same_work = [m / c for m, c in zip(mixed, control, strict=True)]
    print(
        f"engine {ENGINE}{' (synthetic: the pipeline alone)' if ENGINE == 'synthetic' else ''}, {SLOTS} slots, {load()}"
    )
    print(f"interactive TTFT idle: p50 {idle_p50 * 1000:.0f} ms, p99 {idle_p99 * 1000:.0f} ms ({len(idle_t)} probes)")
    print(
        f"interactive TTFT under a flood of {FLOOD} batch requests ({FLOOD // SLOTS}x capacity, {flood_waiting} still "
        f"unstarted when the probes ended): p50 {under_p50 * 1000:.0f} ms, p99 {under_p99 * 1000:.0f} ms; "
        f"one decode step {step * 1000:.1f} ms"
    )
    print(f"  idle: {split[0]}\n  flood: {split[1]}")
    print(
        f"  p50 goal <= 1.5 x idle + step = {(1.5 * idle_p50 + step) * 1000:.0f} ms; "
        f"p99 goal <= 3 x idle p99 = {3 * idle_p99 * 1000:.0f} ms"
    )
    print(
        f"preemptions: {preempted:.0f} in {probed_until - flood_started:.1f} s of probing "
        f"({preempted * 60 / (probed_until - flood_started):.1f}/min); flood drained in {flood_s:.1f} s with "
        f"{runs - len(flood)} continued runs"
    )
    print(
        "batch tokens/s alone: "
        + " ".join(f"{a:.0f}" for a in alone)
        + "; with 10 % interactive: "
        + " ".join(f"{m:.0f}" for m in mixed)
        + f"; ratio min/median/max {min(ratios):.2f}/{statistics.median(ratios):.2f}/{max(ratios):.2f} "
        + f"(interactive tokens {', '.join(f'{c:.0%}' for c in chat_share)} of the batch tokens)"
    )
    print(
        "  the same short requests in the batch class (no priority, no preemption): "
        + " ".join(f"{c:.0f}" for c in control)
        + f" tokens/s; with classes over that: min/median/max {min(same_work):.2f}/{statistics.median(same_work):.2f}/"
        + f"{max(same_work):.2f}"
    )
    return {
        "fair_ttft_ms_p50_idle": idle_p50 * 1000,
        "fair_ttft_ms_p99_idle": idle_p99 * 1000,
        "fair_ttft_ms_p50_flood": under_p50 * 1000,
        "fair_ttft_ms_p99_flood": under_p99 * 1000,
        "fair_decode_step_ms": step * 1000,
        "fair_ttft_p50_vs_goal": under_p50 / (1.5 * idle_p50 + step),
        "fair_ttft_p99_ratio": under_p99 / idle_p99,
        "fair_batch_throughput_ratio_median": statistics.median(ratios),
        "fair_batch_throughput_vs_same_work_median": statistics.median(same_work),
        "fair_preemptions_per_min": preempted * 60 / (probed_until - flood_started),
    }


def run() -> dict[str, float]:
    metrics_port = free_port()
    settings = bench_settings(bootstrap_from_env(), max_batch_size=SLOTS, engine=ENGINE)
    worker = start_worker(settings, TOKENRELAY_WORKER_METRICS_PORT=str(metrics_port))
    with running(worker):
        return asyncio.run(measure(settings, metrics_port))


if __name__ == "__main__":
    print(run())

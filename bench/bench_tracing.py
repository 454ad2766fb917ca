"""Tracing's cost: the same load through two stacks (gateway + synthetic-engine worker), one exporting its traces to
a local OTLP receiver and one with tracing off, in interleaved rounds on one broker.

Per round and stack: STREAMS OpenAI streaming completions at once, each submitted and streamed in one HTTP request
(a submit span at the gateway; queue wait, prefill, decode and publish spans at the worker; a first-byte span at
the gateway), TOKENS tokens each from a synthetic engine fast enough that the pipeline, not the engine, sets the
pace. Tokens/s = all completion tokens / the round's wall time; CPU per token = CPU seconds of the stack's processes
in the round / tokens. Ratios are on / off of the same round pair (the order alternates); min / median / max.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.otlp_receiver import OtlpReceiver
from bench.support import (
    bench_settings,
    bootstrap_from_env,
    load,
    start_gateway,
    start_worker,
    stop_process,
    tree_cpu_seconds,
)
from schemas.ids import new_request_id
from schemas.records import InferenceRequest
from services import tracing
from services.kafka import record_headers
from services.settings import Settings
from services.tracing import FIRST_BYTE
from workers.spans import RunSpans

STREAMS = int(os.environ.get("BENCH_TRACING_STREAMS", "64"))
TOKENS = int(os.environ.get("BENCH_TRACING_TOKENS", "1000"))
RATE = float(os.environ.get("BENCH_TRACING_RATE", "500"))  # tokens/s per stream (synthetic engine)
ROUNDS = int(os.environ.get("BENCH_TRACING_ROUNDS", "6"))


@dataclass
class Stack:
    name: str
    settings: Settings
    procs: list[Any]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_port}"


def _stack(name: str, bootstrap: str, env: dict[str, str]) -> Stack:
    settings = bench_settings(bootstrap, max_batch_size=STREAMS, engine="synthetic", synthetic_tokens_per_s=RATE)
    gateway = start_gateway(settings, 60.0, **env)
    worker = start_worker(settings, **env)
    return Stack(name, settings, [gateway, worker])


async def _submit(stack: Stack, count: int, tokens: int = TOKENS) -> list[str]:
    async with aiohttp.ClientSession() as session:

        async def one() -> str:
            body = {"prompt": "bench", "max_tokens": tokens}
            async with session.post(f"{stack.base}/v1/requests", json=body) as response:
                if response.status != 202:
                    raise RuntimeError(f"submit: {response.status} {await response.text()}")
                return str((await response.json())["id"])

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def _wait_serving(stack: Stack, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await _submit(stack, 1, tokens=4)
            return
        except (RuntimeError, aiohttp.ClientError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _stream_all(stack: Stack) -> tuple[int, float]:
    """STREAMS OpenAI streaming completions at once (each submits and streams in one request); their completion
    tokens (from the usage chunk) and the wall time from the first submit to the last [DONE]."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> int:
            body = {
                "prompt": "bench",
                "max_tokens": TOKENS,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            tokens = 0
            async with session.post(f"{stack.base}/v1/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"{stack.name}: {response.status} {await response.text()}")
                async for line in response.content:
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        usage = json.loads(line[6:]).get("usage") or {}
                        tokens = int(usage.get("completion_tokens", tokens))
            return tokens

        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(STREAMS)))
        return sum(counts), time.perf_counter() - started


def _round(stack: Stack) -> tuple[float, float, int]:
    """Tokens/s, CPU seconds of the stack per 1,000 tokens, and tokens of one round."""
    cpu_before = sum(tree_cpu_seconds(p.pid) for p in stack.procs)
    tokens, wall_s = asyncio.run(_stream_all(stack))
    cpu = sum(tree_cpu_seconds(p.pid) for p in stack.procs) - cpu_before
    if tokens != STREAMS * TOKENS:
        raise RuntimeError(f"{stack.name}: {tokens} tokens of {STREAMS * TOKENS}")
    return tokens / wall_s, 1000 * cpu / tokens, tokens


def _span_cost_ms(endpoint: str, requests: int = 2000) -> float:
    """CPU milliseconds per request of what tracing adds in-process: a request's six spans made as the services make
    them (submit, queue wait, prefill, decode, publish, first byte), its context put in and read from headers, and the
    spans' export by the SDK's batch processor and OTLP/HTTP exporter (its thread counts: process time)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=6 * requests + 64))  # none dropped
    tracing.install_for_tests(provider)
    try:
        request = InferenceRequest(new_request_id(), "bench", TOKENS, model="default")
        started = time.process_time()
        for _ in range(requests):
            submit = tracing.start_span(
                tracing.SUBMIT, None, kind="producer", attributes=tracing.request_attributes(request)
            )
            trace = tracing.record_trace(record_headers("InferenceRequest", tracing.trace_of(submit)))
            submit.end()
            spans = RunSpans(request, trace, "run", "w", queued_from_ns=time.time_ns(), prompt_tokens=1)
            spans.in_engine()
            spans.first_token()
            spans.ended("length", TOKENS, TOKENS)
            spans.published(True)
            first = tracing.start_span(tracing.FIRST_BYTE, trace, kind="server", attributes={"a": 1})
            first.end()
        provider.force_flush()
        return 1000 * (time.process_time() - started) / requests
    finally:
        tracing.install_for_tests(None)
        provider.shutdown()


def _summary(values: list[float]) -> str:
    return f"min {min(values):.3f} / median {statistics.median(values):.3f} / max {max(values):.3f}"


def run() -> dict[str, float]:
    bootstrap = bootstrap_from_env()
    with OtlpReceiver() as receiver:
        stacks = [_stack("on", bootstrap, receiver.env()), _stack("off", bootstrap, {})]
        try:
            for stack in stacks:
                asyncio.run(_wait_serving(stack))
            tokens_ratio: list[float] = []
            cpu_ratio: list[float] = []
            cpu_off: list[float] = []  # CPU seconds per token
            for r in range(ROUNDS):
                measured: dict[str, tuple[float, float, int]] = {}
                for stack in stacks if r % 2 == 0 else stacks[::-1]:
                    measured[stack.name] = _round(stack)
                    tps, cpu, tokens = measured[stack.name]
                    print(
                        f"round {r + 1} tracing {stack.name:3}: {tps:,.0f} tokens/s, {cpu:.3f} CPU s per 1k tokens "
                        f"({tokens} tokens); {load()}",
                        flush=True,
                    )
                tokens_ratio.append(measured["on"][0] / measured["off"][0])
                cpu_off.append(measured["off"][1] / 1000)
                cpu_ratio.append(measured["on"][1] / measured["off"][1])
            time.sleep(1.0)  # the last spans' export (every 100 ms)
            first_bytes = sum(1 for s in receiver.received() if s.name == FIRST_BYTE)
            span_ms = _span_cost_ms(receiver.endpoint)
        finally:
            for stack in stacks:
                for proc in stack.procs:
                    stop_process(proc)
    print(f"spans received: {len(receiver.received())} ({first_bytes} first-byte spans) in {receiver.requests} exports")
    print(f"tokens/s, tracing on / off: {_summary(tokens_ratio)}")
    print(f"CPU per token, tracing on / off: {_summary(cpu_ratio)}")
    off_ms = 1000 * statistics.median(cpu_off) * TOKENS  # CPU ms per request with tracing off (median round)
    print(
        f"spans of one request, made and exported in-process: {span_ms:.3f} CPU ms = {100 * span_ms / off_ms:.2f} % of "
        f"the {off_ms:.1f} CPU ms the stack spends per {TOKENS}-token request with tracing off"
    )
    return {
        "tracing_tokens_per_s_ratio_median": statistics.median(tokens_ratio),
        "tracing_tokens_per_s_ratio_min": min(tokens_ratio),
        "tracing_cpu_per_token_ratio_median": statistics.median(cpu_ratio),
        "tracing_span_cpu_ms_per_request": span_ms,
        "tracing_span_cpu_share": span_ms / off_ms,
    }


if __name__ == "__main__":
    run()

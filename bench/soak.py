"""`make soak`: the pipeline (synthetic engine) at half capacity, sampling gateway and worker RSS and fds."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.chaos_checks import slope_per_hour
from bench.support import (
    ROOT,
    bench_settings,
    load,
    process_stats,
    raise_fd_limit,
    running,
    start_gateway,
    start_worker,
)

RESULTS = Path(__file__).parent / "results"
# The pipeline benchmark sustains 256 streams x 100 tokens/s (25,600 tokens/s) at a ratio of about 0.98 on a
# 2-core machine; half of that is the default load here.
DEFAULT_STREAMS = 128
DEFAULT_RATE = 100.0
TOKENS_PER_REQUEST = 500


# --- the load: client processes that keep N requests in flight, submitting through the gateway's HTTP API ---------


async def _slots(base: str, slots: int, seconds: float) -> dict[str, int]:
    stats = {"requests": 0, "tokens": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=120)

    async def slot(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            try:
                body = {"prompt": "soak", "max_tokens": TOKENS_PER_REQUEST}
                async with session.post(f"{base}/v1/requests", json=body) as response:
                    if response.status != 202:
                        stats["errors"] += 1
                        await asyncio.sleep(0.5)
                        continue
                    events_url = (await response.json())["events_url"]
                async with session.get(base + events_url if events_url.startswith("/") else events_url) as response:
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        buffer += chunk
                        *blocks, buffer = buffer.split(b"\n\n")
                        for block in blocks:
                            if b"event: token" in block:
                                stats["tokens"] += len(json.loads(block[block.index(b"data: ") + 6 :])["token_ids"])
                        if b"event: done" in chunk or b"event: error" in chunk:
                            break
                stats["requests"] += 1
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                stats["errors"] += 1
                await asyncio.sleep(0.5)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(slot(session) for _ in range(slots)))
    return stats


def _spawn_load(base: str, slots: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--load", base, str(slots), str(seconds)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


# --- sampling and reporting ----------------------------------------------------------------------------------------


def _sample(t0: float, gateway_pid: int, worker_pid: int) -> dict[str, float]:
    gw_rss, gw_fds = process_stats(gateway_pid)
    wk_rss, wk_fds = process_stats(worker_pid)
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "gateway_rss_mib": round(gw_rss, 1),
        "gateway_fds": gw_fds,
        "worker_rss_mib": round(wk_rss, 1),
        "worker_fds": wk_fds,
        "load1": round(os.getloadavg()[0], 2),
    }


def _print_row(row: dict[str, float]) -> None:
    print(
        f"{row['t_s']:>8.0f} {row['gateway_rss_mib']:>12.1f} {row['gateway_fds']:>8.0f} "
        f"{row['worker_rss_mib']:>12.1f} {row['worker_fds']:>8.0f} {row['load1']:>6.2f}",
        flush=True,
    )


def soak(minutes: float, interval_s: float, streams: int, rate: float, processes: int) -> dict[str, Any]:
    raise_fd_limit()
    bootstrap = os.environ.get("TOKENRELAY_KAFKA_BOOTSTRAP") or os.environ.get("TOKENRELAY_TEST_KAFKA")
    broker = None
    if not bootstrap:
        import tempfile

        from services.local.broker.runner import LocalBroker
        from services.settings import Settings

        broker = LocalBroker(Settings.from_env(), port=0, data_dir=Path(tempfile.mkdtemp(prefix="tokenrelay-soak-")))
        bootstrap = broker.start()
    try:
        settings = bench_settings(bootstrap)
        base = f"http://127.0.0.1:{settings.gateway_port}"
        gateway = start_gateway(settings)
        worker = start_worker(
            settings,
            TOKENRELAY_ENGINE="synthetic",
            TOKENRELAY_SYNTHETIC_TOKENS_PER_S=str(rate),
            TOKENRELAY_MAX_BATCH_SIZE=str(streams),
        )
        with running(gateway, worker):
            duration = minutes * 60
            warm_up = min(60.0, duration * 0.1)
            print(
                f"soak (synthetic engine): {streams} concurrent requests x {rate:g} tokens/s "
                f"({streams * rate:,.0f} tokens/s, half the pipeline benchmark's load) for {minutes:g} min "
                f"after {warm_up:.0f} s warm-up; sampling every {interval_s:g} s; {load()}",
                flush=True,
            )
            per = [streams // processes + (1 if i < streams % processes else 0) for i in range(processes)]
            loads = [_spawn_load(base, n, warm_up + duration) for n in per if n]
            time.sleep(warm_up)
            t0 = time.monotonic()
            print(f"{'t (s)':>8} {'gateway MiB':>12} {'gw fds':>8} {'worker MiB':>12} {'wk fds':>8} {'load':>6}")
            samples = []
            while True:
                row = _sample(t0, gateway.pid, worker.pid)
                samples.append(row)
                _print_row(row)
                if time.monotonic() - t0 >= duration - 1:
                    break
                time.sleep(max(0.0, min(interval_s, duration - (time.monotonic() - t0))))
            totals = {"requests": 0, "tokens": 0, "errors": 0}
            for proc in loads:
                out, _ = proc.communicate(timeout=180)
                for line in out.splitlines():
                    if line.startswith("RESULT "):
                        for key, value in json.loads(line.removeprefix("RESULT ")).items():
                            totals[key] += value
            alive = gateway.poll() is None and worker.poll() is None
    finally:
        if broker is not None:
            broker.stop()
    times = [s["t_s"] for s in samples]
    growth: dict[str, dict[str, float]] = {}
    for key in ("gateway_rss_mib", "gateway_fds", "worker_rss_mib", "worker_fds"):
        values = [float(s[key]) for s in samples]
        growth[key] = {
            "first": values[0],
            "last": values[-1],
            "growth": values[-1] - values[0],
            "slope_per_hour": slope_per_hour(times, values),
        }
    print("growth (first -> last, least-squares slope per hour):")
    for key, g in growth.items():
        print(f"  {key:<16} {g['first']:>9.1f} -> {g['last']:>9.1f} ({g['growth']:+.1f}; {g['slope_per_hour']:+.1f}/h)")
    served = totals["tokens"] / max(1.0, warm_up + duration)
    print(
        f"served {totals['requests']:,} requests, {totals['tokens']:,} tokens ({served:,.0f} tokens/s), "
        f"{totals['errors']} client errors; gateway and worker {'still running' if alive else 'DIED'}; {load()}"
    )
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "engine": "synthetic",
        "minutes": minutes,
        "warm_up_s": warm_up,
        "streams": streams,
        "tokens_per_s_per_stream": rate,
        "samples": samples,
        "growth": growth,
        "totals": totals,
        "tokens_per_s": served,
        "alive": alive,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--streams", type=int, default=DEFAULT_STREAMS, help="concurrent requests")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="tokens/s per request (synthetic engine)")
    parser.add_argument("--client-processes", type=int, default=2)
    args = parser.parse_args()
    report = soak(args.minutes, args.interval, args.streams, args.rate, args.client_processes)
    return 0 if report["alive"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        raise_fd_limit()
        result = asyncio.run(_slots(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        print("RESULT " + json.dumps(result), flush=True)
    else:
        sys.exit(main())

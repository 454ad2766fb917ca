"""What the embedded schema registry adds to `tokenrelay up`: time to the banner and the registry's RSS.

Interleaved A/B rounds, each a fresh `tokenrelay up` on its own broker and ports: A with a registry that
already runs (``--registry URL``, nothing local starts), B with the embedded Apicurio started by `up`.
``python -m bench.bench_startup --registry URL [--rounds N]``; prints min/median/max of each side.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BANNER_TIMEOUT_S = 600.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_start(registry_url: str | None) -> tuple[float, float | None]:
    """Seconds from `tokenrelay up` to its banner, and the embedded registry's RSS in MiB then (None for A)."""
    data = tempfile.mkdtemp(prefix="tokenrelay-startup-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") or k == "TOKENRELAY_CACHE_DIR"}
    env |= {
        "TOKENRELAY_BROKER_PORT": str(_free_port()),
        "TOKENRELAY_BROKER_DATA_DIR": f"{data}/broker",
        "TOKENRELAY_GATEWAY_PORT": str(_free_port()),
        "TOKENRELAY_ANALYTICS_PORT": str(_free_port()),
        "TOKENRELAY_REGISTRY_PORT": str(_free_port()),
        "TOKENRELAY_WORKER_METRICS_PORT": "0",
    }
    if registry_url:
        env["TOKENRELAY_SCHEMA_REGISTRY_URL"] = registry_url
    began = time.monotonic()
    with open(f"{data}/up.log", "w") as log:
        argv = [sys.executable, "-m", "services.cli", "up"]
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    try:
        took = None
        for line in proc.stdout:
            if "Ctrl-C stops everything" in line:
                took = time.monotonic() - began
                break
            if time.monotonic() - began > BANNER_TIMEOUT_S:
                break
        if took is None:
            raise RuntimeError(f"`tokenrelay up` gave no banner; see {data}/up.log")
        rss = None
        for child in psutil.Process(proc.pid).children(recursive=True):
            if any("quarkus-run.jar" in arg for arg in child.cmdline()):
                rss = child.memory_info().rss / 2**20
        return took, rss
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        proc.stdout.close()


def _mmm(values: list[float]) -> str:
    return f"min {min(values):.1f} / median {statistics.median(values):.1f} / max {max(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, help="URL of a registry that already runs (side A)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    a: list[float] = []
    b: list[float] = []
    rss: list[float] = []
    for n in range(args.rounds):
        for embedded in (False, True):
            took, mib = one_start(None if embedded else args.registry)
            (b if embedded else a).append(took)
            if mib is not None:
                rss.append(mib)
            print(f"round {n + 1} {'B embedded' if embedded else 'A existing'}: {took:.1f} s", flush=True)
    print(f"A, registry already running: {_mmm(a)} s to the banner")
    print(f"B, embedded registry:        {_mmm(b)} s to the banner")
    print(f"added by the registry (median B - median A): {statistics.median(b) - statistics.median(a):.1f} s")
    if rss:
        print(f"registry RSS at the banner: {_mmm(rss)} MiB")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make chaos`: random faults across every tier under a seeded mixed load; the log decides whether anything was lost.

The system is a 3-node cluster (RF 3, min ISR 2), the schema registry, 2 workers on the built-in model, 2 gateways
and analytics. Clients of every kind submit, disconnect, resume on a random gateway and cancel while faults hit one
component at a time (SIGKILL, SIGSTOP for 1-20 s, SIGTERM and restart; one whole-cluster outage longer than the
producer timeout). At the end every client's trace is checked against the events topic read straight from Kafka.
Exits 1 when an invariant is broken; the seed replays the same choices (not the timing of a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.chaos_checks import (
    Fault,
    Trace,
    Verdict,
    check,
    log_totals,
    longest_gap,
    memory_bounded,
    stalls_by_fault,
)
from bench.chaos_load import Load, greedy_references
from bench.chaos_system import ROLES, System, analytics_usage
from bench.support import load, raise_fd_limit
from schemas.errors import DecodeError
from schemas.records import TokenEvent
from services.kafka import make_consumer, read_to_end, start_client
from services.schema_registry import reading_codec
from services.settings import Settings
from tests.integration.cluster_support import ClusterProcess

RESULTS = Path(__file__).parent / "results"
RECOVER_TIMEOUT_S = 300.0
SAMPLE_EVERY_S = 10.0


@dataclass
class Plan:
    """How hard a run pushes: its length, load and fault spacing."""

    minutes: float
    seed: int
    rate_per_s: float = 1.0
    fault_gap_s: tuple[float, float] = (20.0, 60.0)
    stop_s: tuple[float, float] = (1.0, 20.0)
    producer_timeout_ms: int = 10_000
    outage_extra_s: tuple[float, float] = (3.0, 8.0)
    settle_s: float = 300.0  # how long clients and the log may take to end after the load stops

    @classmethod
    def short(cls, minutes: float, seed: int) -> Plan:
        """The test's run: a lower load, faults closer together, short stops."""
        return cls(
            minutes,
            seed,
            rate_per_s=0.6,
            fault_gap_s=(5.0, 12.0),
            stop_s=(1.0, 6.0),
            producer_timeout_ms=6000,
            settle_s=180.0,
        )


@dataclass
class Report:
    seed: int
    minutes: float
    faults: list[Fault] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    verdict: Verdict = field(default_factory=Verdict)
    health: dict[str, bool] = field(default_factory=dict)
    analytics: dict[str, Any] | None = None
    log_totals: dict[str, int] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_bounded: bool = True
    stalls: dict[str, float] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    client_errors: list[str] = field(default_factory=list)
    clients_cut_off: int = 0
    resumes: int = 0
    traces: list[Trace] = field(default_factory=list)

    def invariants(self) -> dict[str, bool]:
        out = self.verdict.invariants()
        out["analytics totals equal the log's"] = (
            self.analytics is not None and self.analytics.get("totals") == self.log_totals
        )
        out["every component healthy again"] = bool(self.health) and all(self.health.values())
        out["no component died on its own"] = not self.unexpected_exits
        out["memory of every process bounded"] = self.memory_bounded
        out["no client still waiting at the end"] = not self.clients_cut_off
        return out

    @property
    def ok(self) -> bool:
        return all(self.invariants().values())


# --- faults -----------------------------------------------------------------------------------------------------


def _pick_target(system: System, rng: random.Random) -> str:
    role = rng.choice(ROLES)
    return rng.choice(sorted(n for n, m in system.members.items() if m.role == role))


def _stop_and_restart(system: System, name: str, sig: int) -> str:
    """SIGKILL or SIGTERM a member and start it again (a broker node is restarted by the cluster command)."""
    member = system.members[name]
    pid = system.pid(name)
    if pid is None:
        return "was down already"
    member.expected_down = member.role != "broker"
    system.signal(name, sig)
    _wait_gone(pid, 30.0 if sig == signal.SIGTERM else 10.0)
    if member.role == "broker":
        return f"pid {pid}"
    if member.role == "gateway":
        proc = system.gateway(name).proc
        if proc is not None:
            proc.wait(30)
    elif member.proc is not None:
        member.proc.wait(30)
    system.launch(name)
    return f"pid {pid}"


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Until ``pid`` has exited (SIGKILL after ``timeout_s``: a graceful stop that hangs is reported as taking long)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
    except psutil.Error:
        return


def _pause(system: System, names: Sequence[str], seconds: float) -> str:
    pids = [pid for name in names if (pid := system.pid(name)) is not None]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return f"{len(pids)} process(es) stopped {seconds:.1f}s"


def inject(system: System, plan: Plan, rng: random.Random, outage: bool) -> Fault:
    """One fault, then wait until every component is healthy again."""
    began = time.monotonic()
    stale: set[str] = set()
    if outage:
        seconds = plan.producer_timeout_ms / 1000 + rng.uniform(*plan.outage_extra_s)
        kind, target = "outage", "cluster"
        detail = _pause(system, ["broker-1", "broker-2", "broker-3"], seconds)
    else:
        kind = rng.choices(["sigkill", "sigstop", "sigterm"], [4, 3, 2])[0]
        target = _pick_target(system, rng)
        if kind != "sigstop" and target.startswith("worker"):
            # Until the stopped worker has left the group: its requests have moved and the new process has joined.
            stale = system.worker_members()
        if kind == "sigstop":
            detail = _pause(system, [target], rng.uniform(*plan.stop_s))
        else:
            detail = _stop_and_restart(system, target, signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
    health = system.wait_healthy(RECOVER_TIMEOUT_S, stale)
    sick = sorted(n for n, ok in health.items() if not ok)
    if sick:
        detail += f"; still unhealthy after {RECOVER_TIMEOUT_S:.0f}s: {', '.join(sick)}"
    fault = Fault(kind, target, began, time.monotonic(), detail)
    print(
        f"  [{time.strftime('%H:%M:%S')}] {kind} {target}: {detail}; healthy again after "
        f"{fault.recovered - fault.began:.1f}s; {load()}",
        flush=True,
    )
    return fault


async def fault_loop(system: System, plan: Plan, rng: random.Random, stop: asyncio.Event, report: Report) -> None:
    duration = plan.minutes * 60
    start = time.monotonic()
    outage_at = start + duration * rng.uniform(0.3, 0.6)
    outage_done = False
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(*plan.fault_gap_s))
            break
        except TimeoutError:
            pass
        outage = not outage_done and time.monotonic() >= outage_at
        outage_done = outage_done or outage
        # The generator is advanced here, not in the thread, so the fault sequence follows the seed alone.
        fault_rng = random.Random(rng.getrandbits(64))
        report.faults.append(await asyncio.to_thread(inject, system, plan, fault_rng, outage))
        report.unexpected_exits += await asyncio.to_thread(system.reap)
    if not outage_done:
        report.faults.append(await asyncio.to_thread(inject, system, plan, random.Random(rng.getrandbits(64)), True))


async def sampler(system: System, stop: asyncio.Event, samples: dict[str, list[tuple[float, float]]]) -> None:
    """RSS of every member every SAMPLE_EVERY_S, one series per process (a restart starts a new series)."""
    t0 = time.monotonic()
    while not stop.is_set():
        for name, (pid, rss) in (await asyncio.to_thread(system.rss)).items():
            samples.setdefault(f"{name} (pid {pid})", []).append((time.monotonic() - t0, rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


# --- the log --------------------------------------------------------------------------------------------------


async def read_log(settings: Settings) -> dict[str, list[tuple[int, int, TokenEvent]]]:
    """Every record of the events topic up to its end now, by request id, in log order."""
    codec = reading_codec(settings)
    consumer = make_consumer(settings, max_partition_fetch_bytes=8 << 20)
    await start_client(consumer)
    out: dict[str, list[tuple[int, int, TokenEvent]]] = {}
    try:
        async for tp, r in read_to_end(consumer, settings.events_topic, settings.events_partitions, poll_ms=1000):
            if r.value is None:
                continue
            try:
                ev = await asyncio.to_thread(codec.decode_event, r.value)
            except DecodeError:
                continue
            out.setdefault(ev.request_id, []).append((tp.partition, r.offset, ev))
    finally:
        await consumer.stop()
    return out


async def settled_log(settings: Settings, traces: Sequence[Trace], timeout_s: float) -> dict[str, Any]:
    """The log once every request in it has ended (requests whose submit answer was lost may still run), or as it
    is at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = await read_log(settings)
        verdict = check(traces, log, {})
        if not (verdict.unended or verdict.log_only_unended) or time.monotonic() > deadline:
            return log
        await asyncio.sleep(5)


async def settled_analytics(port: int, expected: dict[str, int], timeout_s: float) -> dict[str, Any] | None:
    """/usage once its totals equal the log's, or its last answer at the deadline."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(analytics_usage, port) or last
        if last is not None and last.get("totals") == expected:
            return last
        await asyncio.sleep(2)
    return last


# --- the run --------------------------------------------------------------------------------------------------


async def _run(system: System, settings: Settings, plan: Plan, references: dict[str, str]) -> Report:
    rng = random.Random(plan.seed)
    report = Report(plan.seed, plan.minutes)
    load_gen = Load(settings, system.gateway_urls, random.Random(rng.getrandbits(64)), plan.rate_per_s)
    fault_rng = random.Random(rng.getrandbits(64))
    stop, stop_sampling = asyncio.Event(), asyncio.Event()
    samples: dict[str, list[tuple[float, float]]] = {}
    sampling = asyncio.create_task(sampler(system, stop_sampling, samples))
    loading = asyncio.create_task(load_gen.run(stop))
    faulting = asyncio.create_task(fault_loop(system, plan, fault_rng, stop, report))
    await asyncio.sleep(plan.minutes * 60)
    stop.set()
    print(f"load and faults stopped at {plan.minutes:g} min; waiting for the last fault and every client", flush=True)
    await loading
    await faulting
    report.clients_cut_off = await load_gen.drain(plan.settle_s)
    report.health = await asyncio.to_thread(system.wait_healthy, RECOVER_TIMEOUT_S)
    report.unexpected_exits += await asyncio.to_thread(system.reap)
    stop_sampling.set()
    await sampling
    traces = report.traces = load_gen.traces
    log = await settled_log(settings, traces, plan.settle_s / 2)
    report.verdict = check(traces, log, references)
    report.log_totals = log_totals(log)
    report.analytics = await settled_analytics(system.analytics_port, report.log_totals, 180.0)
    for name, series in samples.items():
        bounded, figures = memory_bounded(series)
        report.memory[name] = figures | {"bounded": bounded}
        report.memory_bounded = report.memory_bounded and bounded
    report.stalls = stalls_by_fault(traces, report.faults)
    report.requests = dict(Counter(t.kind for t in traces))
    report.refused = dict(load_gen.refused)
    report.client_errors = list(load_gen.client_errors)
    report.resumes = sum(t.resumes for t in traces)
    longest = max(traces, key=lambda t: longest_gap(t.arrivals)[0], default=None)
    if longest is not None:
        print(f"longest stall: {longest_gap(longest.arrivals)[0]:.1f}s ({longest.kind} {longest.request_id})")
    return report


def print_report(report: Report) -> None:
    v = report.verdict
    faults = Counter(f.name for f in report.faults)
    print(f"\nchaos run: seed {report.seed}, {report.minutes:g} min, {len(report.faults)} faults")
    print(f"  {'fault':<20} {'count':>6} {'longest client stall (s)':>26}")
    for name in sorted(faults):
        print(f"  {name:<20} {faults[name]:>6} {report.stalls.get(name, 0.0):>26.1f}")
    print(f"  {'(no fault)':<20} {'':>6} {report.stalls.get('none', 0.0):>26.1f}")
    print(f"  {'requests':<20} {'count':>6}")
    for kind, n in sorted(report.requests.items()):
        print(f"  {kind:<20} {n:>6}")
    print(
        f"  accepted {v.accepted} (+{v.log_only} only in the log), ended {v.ended}, unended "
        f"{len(v.unended) + len(v.log_only_unended)}, lost (gaps) {len(v.gaps)}, duplicated (repeats) "
        f"{len(v.repeats)}, two ends {len(v.repeated_end)}, wrong text {len(v.text_mismatch)}, greedy checked "
        f"{v.greedy_checked} wrong {len(v.greedy_mismatch)}; resumes {report.resumes}; OpenAI streams cut "
        f"{v.cut_streams}, ended 'restarted' {v.restarted_streams}; fenced terminal records {v.extra_terminal_records}"
    )
    if report.refused:
        print(f"  refused or failed submits: {dict(sorted(report.refused.items()))}")
    for error in report.client_errors:
        print("  a client's own failure:\n    " + error.rstrip().replace("\n", "\n    "))
    if report.unexpected_exits:
        print(f"  died on their own: {report.unexpected_exits}")
    print(f"  analytics {(report.analytics or {}).get('totals')} vs log {report.log_totals}")
    for name, figures in sorted(report.memory.items()):
        if figures.get("samples", 0) >= 8:
            print(
                f"  RSS {name:<28} {figures['early_mib']:>7.1f} -> {figures['late_mib']:>7.1f} MiB "
                f"({figures['slope_mib_per_h']:+.1f} MiB/h){'' if figures['bounded'] else '  UNBOUNDED'}"
            )
    print("  invariants:")
    for name, held in report.invariants().items():
        print(f"    {'ok  ' if held else 'FAIL'} {name}")
    unfinished = {t.request_id: t for t in report.traces if t.request_id in v.client_unfinished}
    for rid, t in list(unfinished.items())[:10]:
        print(f"  client unfinished: {t.kind} {rid}: {len(t.events)} events, {t.resumes} resumes {t.failure}".rstrip())
    for what in ("unended", "log_only_unended", "gaps", "repeats", "repeated_end", "text_mismatch", "greedy_mismatch"):
        ids = getattr(v, what)
        if ids:
            print(f"  {what}: {ids[:10]}{' ...' if len(ids) > 10 else ''}")
    print(f"replay with: CHAOS_SEED={report.seed} CHAOS_MINUTES={report.minutes:g} make chaos")


def write_report(report: Report, path: Path) -> None:
    data = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": report.seed,
        "minutes": report.minutes,
        "ok": report.ok,
        "invariants": report.invariants(),
        "faults_by_kind": dict(Counter(f.name for f in report.faults)),
        "faults": [asdict(f) | {"recovery_s": round(f.recovered - f.began, 1)} for f in report.faults],
        "longest_stall_s_by_fault": {k: round(s, 2) for k, s in report.stalls.items()},
        "requests_by_kind": report.requests,
        "verdict": asdict(report.verdict),
        "refused": report.refused,
        "client_errors": report.client_errors,
        "resumes": report.resumes,
        "unexpected_exits": report.unexpected_exits,
        "health": report.health,
        "analytics_totals": (report.analytics or {}).get("totals"),
        "log_totals": report.log_totals,
        "memory": report.memory,
        "clients_cut_off": report.clients_cut_off,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run(plan: Plan, results: Path | None = RESULTS / "chaos.json", cluster: ClusterProcess | None = None) -> Report:
    """Start the system (on ``cluster`` when given), run the plan, check, print and write the report."""
    raise_fd_limit()
    print(f"chaos: seed {plan.seed}, {plan.minutes:g} min, {plan.rate_per_s:g} requests/s; {load()}", flush=True)
    references = greedy_references()
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-chaos-"))
    system = System(workdir, plan.producer_timeout_ms, cluster)
    began = time.monotonic()
    try:
        settings = system.start()
        print(f"system up in {time.monotonic() - began:.0f}s (logs in {workdir}); {load()}", flush=True)
        report = asyncio.run(_run(system, settings, plan, references))
    finally:
        system.stop()
    print_report(report)
    if results is not None:
        write_report(report, results)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("CHAOS_MINUTES") or 10))
    seed_env = os.environ.get("CHAOS_SEED")
    parser.add_argument(
        "--seed", type=int, default=int(seed_env) if seed_env else random.SystemRandom().randrange(2**31)
    )
    parser.add_argument("--short", action="store_true", help="the test's plan: lower load, closer faults")
    args = parser.parse_args()
    plan = Plan.short(args.minutes, args.seed) if args.short else Plan(args.minutes, args.seed)
    report = run(plan)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

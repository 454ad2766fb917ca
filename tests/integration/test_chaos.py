"""A short chaos run (bench/chaos.py): random faults on every tier under a mixed load break no invariant.

A minute and a half of the seeded load (native SSE clients that cut and resume on either gateway, cancels,
batch-class requests, OpenAI chat streams, Responses background streams resumed with ``starting_after``, requests
written straight to Kafka) while SIGKILL, SIGSTOP and SIGTERM hit brokers, workers, gateways, the registry and
analytics one at a time, plus one whole-cluster outage longer than the producer timeout. Every invariant is checked
against the events topic; nothing is timed. ``CHAOS_SEED`` replays another seed.

One defect the chaos runs found is open (docs/reliability.md, "What it found"): a client that never reaches the end
of a request the log shows ended. When only the invariants it breaks fail, the test reports the known defect (an
expected failure); any other broken invariant fails it -- an accepted request that never ends among them.
"""

from __future__ import annotations

import os

import pytest

from bench.chaos import Plan, run
from tests.integration.cluster_support import ClusterProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

MINUTES = 1.5
SEED = 26
OPEN_DEFECTS = {
    "every resumable client reached the end",
    "no client still waiting at the end",
}


class OpenDefect(AssertionError):
    """Only the invariants the open defects break failed (docs/reliability.md)."""


@pytest.mark.xfail(raises=OpenDefect, strict=False, reason="open: a client that never reaches an end the log has")
def test_a_short_chaos_run_breaks_no_invariant(kafka_cluster: ClusterProcess) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or SEED)
    report = run(Plan.short(MINUTES, seed), results=None, cluster=kafka_cluster)
    assert report.faults and any(f.kind == "outage" for f in report.faults)
    assert report.verdict.accepted > 0
    broken = [name for name, held in report.invariants().items() if not held]
    message = f"seed {seed}: broken invariants {broken}; verdict {report.verdict}"
    if broken and set(broken) <= OPEN_DEFECTS:
        raise OpenDefect(message)
    assert not broken, message

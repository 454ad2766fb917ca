"""A short chaos run (bench/chaos.py): random faults on every tier under a mixed load break no invariant.

A minute and a half of the seeded load (native SSE clients that cut and resume on either gateway, cancels, batch-class
requests, OpenAI chat streams, Responses background streams resumed with ``starting_after``, requests written
straight to Kafka) while SIGKILL, SIGSTOP and SIGTERM hit brokers, workers, gateways, the registry and analytics
one at a time, plus one whole-cluster outage longer than the producer timeout. Every invariant is checked against
the events topic; nothing is timed. ``CHAOS_SEED`` replays another seed.
"""

from __future__ import annotations

import os

import pytest

from bench.chaos import Plan, run
from tests.integration.cluster_support import ClusterProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

MINUTES = 1.5
SEED = 26


def test_a_short_chaos_run_breaks_no_invariant(kafka_cluster: ClusterProcess) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or SEED)
    report = run(Plan.short(MINUTES, seed), results=None, cluster=kafka_cluster)
    broken = [name for name, held in report.invariants().items() if not held]
    assert not broken, f"seed {seed}: broken invariants {broken}; verdict {report.verdict}"
    assert report.faults and any(f.kind == "outage" for f in report.faults)
    assert report.verdict.accepted > 0 and report.verdict.ended == report.verdict.accepted

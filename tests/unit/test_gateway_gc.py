"""The gateway trades rare cyclic collections for a short latency tail."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.main import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_tune_gc_raises_thresholds_and_freezes_start_up_objects(restore_gc: None) -> None:
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0

"""`python -m tests.integration.slow_worker`: the ordinary worker, its model engine slowed by a fixed sleep per step.

Tests that must catch requests mid-generation (e.g. a worker SIGKILL) need generations that last seconds on any
machine; the tiny test model is too fast for that. ``TOKENRELAY_TEST_STEP_DELAY_S`` sets the sleep before each
decode step; everything else is the real worker and the real engine.
"""

from __future__ import annotations

import os
import sys
import time

from services.logs import configure_logging
from services.settings import Settings
from workers.engine.engine import Engine
from workers.engine.types import StepOutput
from workers.main import run_worker

_DELAY_S = float(os.environ.get("TOKENRELAY_TEST_STEP_DELAY_S", "0.02"))
_step = Engine.step


def _slow_step(self: Engine) -> list[StepOutput]:
    time.sleep(_DELAY_S)
    return _step(self)


if __name__ == "__main__":
    Engine.step = _slow_step  # type: ignore[method-assign]
    settings = Settings.from_env()
    configure_logging(settings)
    sys.exit(run_worker(settings))

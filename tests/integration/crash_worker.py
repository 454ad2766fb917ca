"""`python -m tests.integration.crash_worker`: the ordinary worker, except that a poison prompt kills its process.

A test hook, not a production switch: the worker process dies (``os._exit``, as an OOM kill or a segfault would end
it) at the first engine step that runs a request whose prompt contains ``TOKENRELAY_TEST_POISON``; everything else
is the real worker and the real engine.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from services.logs import configure_logging
from services.settings import Settings
from workers.engine.engine import Engine
from workers.engine.types import EngineRequest, StepOutput, Turn
from workers.main import run_worker

POISON = os.environ.get("TOKENRELAY_TEST_POISON", "\u2620 poison \u2620")
_encode, _add, _step = Engine.encode_prompt, Engine.add, Engine.step
_poison_ids: set[tuple[int, ...]] = set()
_armed: list[bool] = []


def _encode_prompt(
    self: Engine, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None
) -> list[int]:
    ids = _encode(self, prompt, messages, tools)
    if POISON in prompt:
        _poison_ids.add(tuple(ids))
    return ids


def _add_request(self: Engine, request: EngineRequest) -> None:
    if tuple(request.prompt_ids) in _poison_ids:
        _armed.append(True)
    _add(self, request)


def _crashing_step(self: Engine) -> list[StepOutput]:
    if _armed:
        logging.getLogger(__name__).error("poison request in the batch: the worker process dies now")
        os._exit(137)
    return _step(self)


def _install() -> None:
    patches: dict[str, Any] = {"encode_prompt": _encode_prompt, "add": _add_request, "step": _crashing_step}
    for name, function in patches.items():
        setattr(Engine, name, function)


if __name__ == "__main__":
    _install()
    settings = Settings.from_env()
    configure_logging(settings)
    sys.exit(run_worker(settings))

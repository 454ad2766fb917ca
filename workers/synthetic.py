"""Synthetic engine: fixed-rate tokens and no model, for measuring the pipeline alone."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.sampling import SamplingParams
from workers.engine.port import StepLoopPort
from workers.engine.text import template_turn
from workers.engine.types import EngineRequest, StepOutput, Turn, unsupported

if TYPE_CHECKING:
    from services.settings import Settings

log = logging.getLogger(__name__)

SYNTHETIC_MODEL = "synthetic"
_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


@dataclass(slots=True)
class _Stream:
    request: EngineRequest
    produced: int
    due: float
    aborted: bool = False


class SyntheticEngine:
    """Same interface as the model engine; every request gets one token per 1/rate seconds."""

    kind = "synthetic"
    name = SYNTHETIC_MODEL
    max_positions = 1 << 30
    has_chat_template = True  # it joins the turns' text: chat requests are as good as prompts here

    def __init__(self, tokens_per_s: float, max_batch_size: int):
        self.interval = 1.0 / max(tokens_per_s, 1e-3)
        self.max_batch_size = max_batch_size
        self._streams: dict[str, _Stream] = {}
        self._waiting: list[EngineRequest] = []

    def encode_prompt(self, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None) -> list[int]:
        text = " ".join(template_turn(m)["content"] for m in messages) if messages else prompt
        return [len(word) for word in text.split()] or [0]

    def prepare(self, params: SamplingParams) -> None:
        """It writes words: a request that asks for more (a constraint, logprobs, ...) is refused before it starts."""
        refusal = unsupported(params, frozenset(), "synthetic")
        if refusal is not None:
            raise refusal

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" {_WORDS[i % len(_WORDS)]}" for i in ids)

    def add(self, request: EngineRequest) -> None:
        refusal = unsupported(request.params, frozenset(), "synthetic")
        if refusal is not None:
            raise refusal
        self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.aborted = True
            return True
        for request in self._waiting:
            if request.request_id == request_id:
                self._streams[request_id] = _Stream(request, 0, 0.0, aborted=True)
                self._waiting.remove(request)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self._streams or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def step(self) -> list[StepOutput]:
        now = time.monotonic()
        while self._waiting and len(self._streams) < self.max_batch_size:
            request = self._waiting.pop(0)
            self._streams[request.request_id] = _Stream(request, len(request.resume_ids), now)
        due = min((s.due for s in self._streams.values()), default=now)
        if due > now:
            time.sleep(min(due - now, 0.05))
            now = time.monotonic()
        outputs = []
        for request_id, stream in list(self._streams.items()):
            if stream.aborted:
                outputs.append(StepOutput(request_id, (), "", "aborted"))
                del self._streams[request_id]
                continue
            if stream.due > now:
                continue
            token = stream.produced
            stream.produced += 1
            stream.due += self.interval
            done = stream.produced >= stream.request.params.max_tokens
            outputs.append(StepOutput(request_id, (token,), self.decode([token]), "length" if done else None))
            if done:
                del self._streams[request_id]
        return outputs


def load(settings: Settings, name: str, source: str) -> StepLoopPort:
    """The synthetic engine behind the engine port (its registry entry); ``source`` is ignored: there is no model."""
    log.warning("synthetic engine: %.0f tokens/s per request, no model", settings.synthetic_tokens_per_s)
    engine = SyntheticEngine(settings.synthetic_tokens_per_s, settings.max_batch_size)
    engine.name = name
    return StepLoopPort(engine)

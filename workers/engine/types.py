"""Messages between the worker and an engine, and the engine interface; no torch, so any engine can use them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas.records import ChatMessage
from schemas.sampling import SamplingParams

Turn = ChatMessage | tuple[str, str]  # a chat turn: the record's, or (role, content)


@dataclass(slots=True)
class EngineRequest:
    """What the engine needs of a request; ``resume_ids``/``resume_text`` continue an earlier run."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    resume_ids: list[int] = field(default_factory=list)
    resume_text: str = ""


@dataclass(slots=True, frozen=True)
class StepOutput:
    """New tokens of one request in one step; ``finish_reason`` (stop, length, aborted) set on its last output."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None


class EngineLike(Protocol):
    """What a worker drives: the model engine, the synthetic one, or a test double of either."""

    kind: str  # its name in the engine registry
    name: str
    max_positions: int
    has_chat_template: bool

    def encode_prompt(
        self, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None
    ) -> list[int]: ...
    def prepare(self, params: SamplingParams) -> None: ...
    def add(self, request: EngineRequest) -> None: ...
    def abort(self, request_id: str) -> bool: ...
    def has_work(self) -> bool: ...
    def step(self) -> list[StepOutput]: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...

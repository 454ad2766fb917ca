"""Messages between the worker and an engine, and the engine interface; no torch, so any engine can use them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas.errors import EngineRefused
from schemas.records import ChatMessage, TokenLogprob
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
    # An interactive request beside batch work: its prompt goes first, in a step without the batch's decode rows,
    # so its first token does not wait for a full batch step (engines without classes ignore it).
    urgent: bool = False


@dataclass(slots=True, frozen=True)
class StepOutput:
    """New tokens of one request's choice ``index`` in one step; ``finish_reason`` (stop, length, aborted) set on the
    request's last output only: with n > 1 choices, that of choice 0, and each choice's in ``choice_finish_reasons``.
    ``logprobs`` has one entry per token id when the request asked for logprobs."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    choice_finish_reasons: tuple[str, ...] = ()


# What a request may ask for beyond max_tokens, temperature, top_p, top_k, seed and stop: each SamplingParams field
# and the value that asks for nothing. An engine names the ones it does; it refuses a request that asks for another.
OPTIONS: dict[str, object] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "logit_bias": {},
    "n": 1,
    "logprobs": False,
    "top_logprobs": 0,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
}


def unsupported(params: SamplingParams, supported: frozenset[str], engine: str) -> EngineRefused | None:
    """The refusal for the first option ``params`` asks for that the engine does not do; None when it does them all."""
    for name, default in OPTIONS.items():
        if name not in supported and getattr(params, name) != default:
            return EngineRefused(f"the {engine} engine does not support {name}")
    return None


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

"""Admission of one request, pure: the record, its prompt and what the log already holds → refuse it or run it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from schemas.errors import FieldError
from schemas.records import Failed, InferenceRequest, Started
from schemas.sampling import SamplingParams
from workers.history import Prior


@dataclass(frozen=True, slots=True)
class Limits:
    """What one served model accepts."""

    model: str
    context_length: int
    max_prompt_tokens: int
    max_tokens_limit: int
    has_chat_template: bool
    max_stalled_runs: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """The request ends with ``failed`` before it runs; ``dead_letter`` also copies its record to the DLQ."""

    failed: Failed
    dead_letter: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    """The request runs: its Started record, sampling parameters, and whether it must run alone."""

    started: Started
    params: SamplingParams
    solo: bool
    finish_now: str | None = None  # "length" when earlier runs already produced every token asked for


def sampling_of(request: InferenceRequest) -> SamplingParams:
    """The request's sampling parameters (the record has a field of the same name for each)."""
    return SamplingParams(**{f.name: getattr(request, f.name) for f in dataclasses.fields(SamplingParams)})


def precheck(request: InferenceRequest, prior: Prior, limits: Limits, now_ms: int) -> Refusal | None:
    """What can be refused before the prompt is tokenized."""
    if prior.stalled_runs >= limits.max_stalled_runs:
        message = (
            f"the request stopped {prior.stalled_runs} workers before its first token; "
            "it was moved to the dead-letter topic"
        )
        return Refusal(Failed("worker_crashed", message), dead_letter=True)
    if request.deadline_ms is not None and request.deadline_ms < now_ms:
        return Refusal(Failed("deadline_exceeded", f"deadline {request.deadline_ms} passed before the request started"))
    try:
        sampling_of(request).check(limits.max_tokens_limit)
    except FieldError as exc:
        return Refusal(Failed(f"{exc.field}_invalid", exc.message))
    if request.messages is not None and not limits.has_chat_template:
        return Refusal(Failed("chat_template_missing", f"model {limits.model!r} has no chat template; send a prompt"))
    return None


def admit(
    request: InferenceRequest,
    prompt_tokens: int,
    prior: Prior,
    limits: Limits,
    *,
    worker: str,
    created_ms: int,
    now_ms: int,
) -> Refusal | Admission:
    """Refuse a prompt the model cannot hold, else the Started record of a new run continuing ``prior`` (a request
    with n > 1 choices starts over: a run's continuable text is one choice's)."""
    if request.n > 1:
        prior = dataclasses.replace(prior, token_ids=(), text="")
    if prompt_tokens > limits.max_prompt_tokens:
        message = f"prompt has {prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}"
        return Refusal(Failed("prompt_too_long", message))
    if prompt_tokens + request.max_tokens > limits.context_length:
        message = (
            f"this model's maximum context length is {limits.context_length} tokens; the request asks for "
            f"{prompt_tokens + request.max_tokens} ({prompt_tokens} in the prompt, {request.max_tokens} to generate)"
        )
        return Refusal(Failed("context_length_exceeded", message))
    started = Started(
        worker=worker,
        model=limits.model,
        prompt_tokens=prompt_tokens,
        queue_ms=max(0, now_ms - created_ms),
        tenant=request.tenant,
        continues_run_id=prior.run_id,
        continued_tokens=len(prior.token_ids),
        continued_text=prior.text,
    )
    finish_now = "length" if len(prior.token_ids) >= request.max_tokens else None
    return Admission(started, sampling_of(request), solo=prior.stalled_runs > 0, finish_now=finish_now)

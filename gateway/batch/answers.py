"""A batch line through its endpoint's own code: the record its body becomes, and the body its log answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.api import openai, responses
from gateway.api.context import Gateway, error_body
from gateway.api.responses_events import ResponseEvents, ResponseOptions
from gateway.batch.objects import line_request_id
from schemas.errors import TokenRelayError
from schemas.records import Accepted, InferenceRequest
from schemas.view import EventName, ViewEvent

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"


@dataclass(frozen=True, slots=True)
class LineRecord:
    request: InferenceRequest
    accepted: Accepted | None  # the Responses API's options, recorded before the request


def line_record(gw: Gateway, url: str, body: dict[str, Any], tenant: str) -> LineRecord:
    """The record the endpoint at ``url`` makes of ``body`` (its own function: same checks, same errors)."""
    if url == RESPONSES:
        _, request, accepted = responses.response_request(gw, body, tenant)
        return LineRecord(request, accepted)
    return LineRecord(openai.completion_request(gw, body, tenant, chat=url == CHAT), None)


def batch_record(record: LineRecord, batch_id: str, line: int, created_ms: int, custom_id: str) -> LineRecord:
    """The line's record as the batch submits it: its deterministic id, the batch class, batch id and custom_id."""
    request = dataclasses.replace(
        record.request,
        request_id=line_request_id(batch_id, line, created_ms),
        created_ms=created_ms,
        priority="batch",
        batch_id=batch_id,
        custom_id=custom_id,
    )
    return LineRecord(request, record.accepted)


@dataclass(frozen=True, slots=True)
class LineResult:
    """How a line ended: the endpoint's status and body, its usage; ``cancelled`` lines ran but were stopped."""

    status_code: int
    body: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: bool = False


def line_result(
    url: str,
    request_id: str,
    model: str,
    accepted: Accepted | None,
    events: Iterable[ViewEvent],
    request: InferenceRequest | None = None,
) -> LineResult:
    """The answer the endpoint gives for a request with these view events (up to the terminal one); ``request``
    says how many choices and whether logprobs were asked for."""
    events = list(events)
    done = next((ev for ev in events if ev.event == EventName.DONE), None)
    usage = done.data["usage"] if done is not None else {"prompt_tokens": 0, "completion_tokens": 0}
    prompt_tokens, completion_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    cancelled = done is not None and done.data.get("finish_reason") == "cancelled"
    try:
        if url == RESPONSES:
            options = ResponseOptions.of_accepted(accepted, model)
            surface = ResponseEvents(openai.AnswerFold(model), request_id, options)
            body = _first(responses.whole_step(surface, ev) for ev in events)
        else:
            fold = openai.AnswerFold(model)
            n, logprobs = (request.n, request.logprobs) if request is not None else (1, False)
            whole = openai.Completions(fold, request_id, url == CHAT, n=n, logprobs=logprobs)
            body = _first(openai.whole_step(fold, whole, ev) for ev in events)
    except TokenRelayError as exc:
        return LineResult(exc.http_status, {"error": error_body(exc)}, prompt_tokens, completion_tokens)
    if body is None:
        raise ValueError(f"request {request_id}: no terminal event among its events")
    return LineResult(200, body, prompt_tokens, completion_tokens, cancelled)


def _first(bodies: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    return next((body for body in bodies if body is not None), None)

"""Submitting a request: the record on its model's requests topic, then its Accepted in the events log."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Protocol

from schemas.codec import Codec
from schemas.ids import new_request_id
from schemas.records import Accepted, ChatMessage, Failed, InferenceRequest, TokenEvent
from schemas.sampling import SamplingParams
from services.kafka import record_headers
from services.settings import Settings
from services.tracing import NO_TRACE, TraceHeaders

log = logging.getLogger(__name__)


class Producer(Protocol):
    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: Any = None) -> Any: ...


def new_inference_request(
    prompt: str,
    sampling: SamplingParams,
    tenant: str,
    messages: tuple[ChatMessage, ...] | None = None,
    *,
    model: str,
    priority: str = "interactive",
    deadline_ms: int | None = None,
) -> InferenceRequest:
    """The record a validated submit becomes (at the gateway or the command line), with a fresh UUIDv7 id.

    The record has a field per SamplingParams one: a new sampling parameter reaches it from here, wherever it was read.
    """
    return InferenceRequest(
        request_id=new_request_id(),
        prompt=prompt,
        messages=messages,
        model=model,
        tenant=tenant,
        created_ms=int(time.time() * 1000),
        priority=priority,
        deadline_ms=deadline_ms,
        **{f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)},
    )


async def submit_request(
    producer: Producer,
    settings: Settings,
    codec: Codec,
    request: InferenceRequest,
    accepted: Accepted | None = None,
    *,
    topic: str | None = None,
    trace: TraceHeaders = NO_TRACE,
) -> None:
    """Produce ``request`` to its class's topic (``requests.<model>`` or ``batch.<model>``; or ``topic``), then record
    its acceptance (with its tenant and class) in the events log.

    The Accepted record is what lets every gateway answer status, stream and cancel for the request at once, before
    any worker starts it. It follows the request: if it cannot be written the request still runs (it is in Kafka,
    and a worker's Started makes it known), so the caller must not report a failure, which a client would retry.

    An ``accepted`` given by the caller carries what its answers depend on (the Responses API's background, store and
    metadata): it must be in the log before any worker's event, so it goes first; if either record cannot be written the
    submit fails and a Failed ends the request for every reader (an Accepted given up on may still land later).

    ``trace``: the W3C trace context every record of the request carries in its headers (see services.tracing).
    """
    key = request.request_id.encode()
    topic = topic or settings.requests_topic_for(request.model, request.priority)
    if accepted is not None:
        await _submit_accepted_first(producer, settings, codec, request, accepted, topic, trace)
        return
    await producer.send_and_wait(
        topic,
        codec.encode(request),
        key=key,
        headers=record_headers("InferenceRequest", trace),
    )
    record = TokenEvent(
        request.request_id,
        "",
        0,
        int(time.time() * 1000),
        Accepted(request.model, request.tenant, request.deadline_ms, priority=request.priority),
    )
    try:
        await producer.send_and_wait(
            settings.events_topic, codec.encode(record), key=key, headers=record_headers("TokenEvent", trace)
        )
    except Exception as exc:
        log.warning("request %s: accepted, but its Accepted record was not written: %s", request.request_id, exc)


async def _submit_accepted_first(
    producer: Producer,
    settings: Settings,
    codec: Codec,
    request: InferenceRequest,
    accepted: Accepted,
    topic: str,
    trace: TraceHeaders,
) -> None:
    key = request.request_id.encode()
    event = TokenEvent(request.request_id, "", 0, int(time.time() * 1000), accepted)
    try:
        await producer.send_and_wait(
            settings.events_topic, codec.encode(event), key=key, headers=record_headers("TokenEvent", trace)
        )
        await producer.send_and_wait(
            topic,
            codec.encode(request),
            key=key,
            headers=record_headers("InferenceRequest", trace),
        )
    except BaseException:
        # A send given up on (the caller's timeout, a broker outage) may still be delivered later: the producer keeps
        # the record. An Accepted that lands after a failed submit would leave a request that never ends, so a Failed
        # follows it in the same partition whichever of the two sends failed.
        ended = TokenEvent(
            request.request_id, "", 0, int(time.time() * 1000), Failed("not_submitted", "the request was not submitted")
        )
        try:
            await producer.send_and_wait(
                settings.events_topic, codec.encode(ended), key=key, headers=record_headers("TokenEvent", trace)
            )
        except Exception as exc:
            log.warning("request %s: not submitted, and its end was not recorded: %s", request.request_id, exc)
        raise

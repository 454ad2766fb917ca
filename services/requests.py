"""Submitting a request: the record on its model's requests topic, then its Accepted in the events log."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from schemas.codec import Codec
from schemas.records import Accepted, InferenceRequest, TokenEvent
from services.kafka import record_headers
from services.settings import Settings

log = logging.getLogger(__name__)


class Producer(Protocol):
    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: Any = None) -> Any: ...


async def submit_request(producer: Producer, settings: Settings, codec: Codec, request: InferenceRequest) -> None:
    """Produce ``request`` to ``requests.<model>``, then record its acceptance (with its tenant) in the events log.

    The Accepted record is what lets every gateway answer status, stream and cancel for the request at once, before
    any worker starts it. It follows the request: if it cannot be written the request still runs (it is in Kafka,
    and a worker's Started makes it known), so the caller must not report a failure, which a client would retry.
    """
    key = request.request_id.encode()
    await producer.send_and_wait(
        settings.requests_topic_for(request.model),
        codec.encode(request),
        key=key,
        headers=record_headers("InferenceRequest"),
    )
    accepted = TokenEvent(
        request.request_id, "", 0, int(time.time() * 1000), Accepted(request.model, request.tenant, request.deadline_ms)
    )
    try:
        await producer.send_and_wait(
            settings.events_topic, codec.encode(accepted), key=key, headers=record_headers("TokenEvent")
        )
    except Exception as exc:
        log.warning("request %s: accepted, but its Accepted record was not written: %s", request.request_id, exc)

"""The delivering gateway's span of a client's stream: from its start to the first token written (tracing on only)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from aiohttp import web

from gateway.api.context import Gateway
from schemas.view import EventName, ViewEvent
from services import tracing


class FirstByte:
    """Ends a ``first_byte`` span when the first event that carries text, or ends the stream, is written.

    Its parent is the request's context as the request's records carry it (the submit span), read when the span ends:
    by then the relay has read the records that brought it, on the gateway that owns the request's partition as on
    one that follows it (the owner passes it on in the stream's ``traceparent`` header). A resumed stream is part of
    the same trace (``tokenrelay.resumed``); the context the client sent on this HTTP request, if any, is a link.
    """

    __slots__ = ("api", "client", "gw", "pending", "request_id", "resumed", "start_ns")

    def __init__(self, gw: Gateway, request_id: str, client: tracing.TraceHeaders, *, resumed: bool, api: str):
        self.gw = gw
        self.request_id = request_id
        self.client = client
        self.resumed = resumed
        self.api = api
        self.start_ns = time.time_ns()
        self.pending = True

    def wrote(self, event: ViewEvent | None) -> None:
        """An event was written to the client (None: the stream ended without one)."""
        if not self.pending:
            return
        if event is None:
            self._end("none")
        elif event.event == EventName.TOKEN or event.terminal:
            self._end(event.event.value)

    def wrote_all(self, events: Iterable[ViewEvent]) -> None:
        for event in events:
            if not self.pending:
                return
            self.wrote(event)

    def close(self) -> None:
        """The stream is over (the client left, or was dropped as slow) before any token was written."""
        if self.pending:
            self._end("none")

    def _end(self, first: str) -> None:
        self.pending = False
        parent = self.gw.relay.trace_of(self.request_id) or self.client
        partition = self.gw.relay.partition_of(self.request_id)
        attributes = {
            "tokenrelay.request_id": self.request_id,
            "tokenrelay.api": self.api,
            "tokenrelay.resumed": self.resumed,
            "tokenrelay.followed": not self.gw.relay.owns(partition),
            "tokenrelay.first_event": first,
        }
        links = [self.client] if self.client and self.client != parent else []
        span = tracing.start_span(
            tracing.FIRST_BYTE, parent, kind="server", start_ns=self.start_ns, attributes=attributes, links=links
        )
        span.end()


def first_byte(request: web.Request, gw: Gateway, request_id: str, *, resumed: bool, api: str) -> FirstByte | None:
    """A FirstByte for this stream; None while tracing is off."""
    if not tracing.enabled():
        return None
    return FirstByte(gw, request_id, tracing.http_trace(request.headers), resumed=resumed, api=api)

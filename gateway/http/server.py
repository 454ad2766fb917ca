"""The gateway's HTTP listener: connection cap, request-head timeout, JSON for malformed HTTP, quiet accept errors."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from gateway.http.app import render_error
from schemas.errors import MalformedRequest, RequestTimeout, TokenRelayError, TooManyConnections
from services.settings import Settings

log = logging.getLogger(__name__)

# File descriptors kept free for everything that is not a client connection (Kafka clients, files, the listening
# socket, refusals in flight) when the connection cap is derived from the open-file limit.
MIN_FD_RESERVE = 64
REFUSAL_LINGER_S = 1.0
ACCEPT_ERROR_LOG_INTERVAL_S = 10.0
UNLIMITED_FILES = 1 << 20


def raw_error(exc: TokenRelayError) -> bytes:
    """A complete HTTP/1.1 answer with the error's JSON body, for connections that never reach the application."""
    response = render_error(exc)
    assert isinstance(response.body, bytes)
    status = HTTPStatus(exc.http_status)
    extra = "".join(f"{name}: {value}\r\n" for name, value in exc.headers().items())
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(response.body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + response.body


REFUSED = raw_error(TooManyConnections("connection cap reached"))
HEAD_TIMEOUT = raw_error(RequestTimeout("the request head was not received in time", code="header_timeout"))


def open_file_limit() -> int:
    """The soft open-file limit of this process (an unlimited one counts as 2**20)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (as Go's runtime does); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_FILES)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.info("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return open_file_limit()


def connection_cap(configured: int, fd_limit: int) -> int:
    """The connection cap in force: the setting, but always below the open-file limit, with room for the rest."""
    reserve = max(MIN_FD_RESERVE, fd_limit // 8)
    return max(1, min(configured, fd_limit - reserve))


class AcceptErrorLog:
    """Event-loop exception handler that reports accept() failures (fd exhaustion) at most once per interval.

    asyncio reports every failed accept() with a traceback, and on Linux retries the whole listen backlog per tick:
    at the open-file limit that is megabytes of log per second. Everything else goes to the previous handler.
    """

    def __init__(self, interval_s: float = ACCEPT_ERROR_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.count = 0  # failures not reported yet
        self.total = 0
        self._next_report = 0.0
        self.previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self.previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.count += 1
        self.total += 1
        now = self.clock()
        if now >= self._next_report:
            log.warning(
                "cannot accept connections: %s (%d failed accepts since the last report); lower "
                "TOKENRELAY_HTTP_MAX_CONNECTIONS or raise the open-file limit",
                context.get("exception"),
                self.count,
            )
            self.count = 0
            self._next_report = now + self.interval_s


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler with a deadline for each request head and JSON answers to malformed requests."""

    def __init__(self, listener: Listener, server: web.Server, **kwargs: Any):
        super().__init__(server, **kwargs)
        self._listener = listener
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is cut too

    def connection_lost(self, exc: BaseException | None) -> None:
        self._listener.open -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._disarm()  # the head is complete: from here the body timeout and the handler are in charge
        elif self._head_timer is None:
            self._arm()  # first bytes of a further request on a kept-alive connection

    def _arm(self) -> None:
        self._head_timer = self._loop.call_later(self._listener.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if self._messages or self._request_in_progress or transport is None or transport.is_closing():
            return
        self._listener.head_timeouts += 1
        log.info("closing a connection from %s: no complete request head in time", self.peername)
        transport.write(HEAD_TIMEOUT)
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Our JSON error instead of aiohttp's text (which echoes the raw request); bad input is logged below ERROR."""
        error: TokenRelayError
        if status >= 500:
            log.error("error handling %s %s", request.method, request.path, exc_info=exc)
            error = TokenRelayError("internal error")
        else:
            log.info("malformed HTTP request from %s: %s", request.remote, type(exc).__name__ if exc else message)
            error = MalformedRequest(message or "malformed request")
            if isinstance(exc, LineTooLong):
                error = MalformedRequest("line too long", code="header_too_large")
                error.public_message = "a request line or header is too long"
        if request.writer.output_size > 0:
            raise ConnectionError("a response was partly sent already; closing the connection")
        response = render_error(error)
        response.force_close()
        return response


class _Refusal(asyncio.Protocol):
    """A connection over the cap: a 503 before reading anything, then a short linger so the answer is not reset."""

    def __init__(self, listener: Listener):
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.listener.refused += 1
        self.listener.lingering += 1
        transport.write(REFUSED)
        if self.listener.lingering > self.listener.linger_budget:
            transport.close()  # a flood: give the fds back at once (the client may see a reset instead of the 503)
            return
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read; draining it keeps the kernel from resetting the connection

    def eof_received(self) -> bool:
        return False  # close now

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.lingering -= 1
        if self.timer is not None:
            self.timer.cancel()


class Listener:
    """The gateway's listening socket: serves the aiohttp app through GuardedHandler, refuses past the cap."""

    def __init__(self, runner: web.AppRunner, settings: Settings, *, fd_limit: int | None = None):
        server = runner.server
        assert server is not None, "runner.setup() first"
        self.server = server
        self.settings = settings
        limit = fd_limit if fd_limit is not None else open_file_limit()
        self.max_connections = connection_cap(settings.http_max_connections, limit)
        if self.max_connections < settings.http_max_connections:
            log.warning(
                "serving at most %d connections (TOKENRELAY_HTTP_MAX_CONNECTIONS is %d, but the open-file limit is %d)",
                self.max_connections,
                settings.http_max_connections,
                limit,
            )
        # Refusals linger on half of the descriptors the cap leaves free; past that they close at once.
        self.linger_budget = max(0, (limit - self.max_connections) // 2)
        self.header_timeout_s = settings.http_header_timeout_s
        self.open = 0
        self.refused = 0
        self.lingering = 0
        self.head_timeouts = 0
        self._handler_kwargs: dict[str, Any] = {"keepalive_timeout": settings.http_idle_timeout_s, "access_log": None}
        self._server: asyncio.Server | None = None

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.max_connections:
            return _Refusal(self)
        self.open += 1  # counted here, not in connection_made: a burst of accepts runs many factories in one tick
        return GuardedHandler(self, self.server, loop=asyncio.get_running_loop(), **self._handler_kwargs)

    async def start(self, backlog: int = 2048) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.settings.gateway_host, self.settings.gateway_port
        self._server = await loop.create_server(self, host, port, backlog=backlog, reuse_address=True)

    def close(self) -> None:
        """Stop accepting; open connections are shut down by the runner's cleanup."""
        if self._server is not None:
            self._server.close()

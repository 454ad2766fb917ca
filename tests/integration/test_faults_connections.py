"""Fault tests at the HTTP layer: half-open connections past the fd limit, slow heads and bodies, malformed HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from services.topics import ensure_topics
from tests.integration.gateway_support import GatewayProcess, gateway_settings, raw_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "  # never finished


def json_error(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and error object of one raw HTTP answer carrying our JSON error body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str), error
    return status, error


class Countdown:
    """Set once `n` ticks happened."""

    def __init__(self, n: int):
        self.left = n
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


async def slowloris(port: int, deadline_s: float, sent: Countdown | None = None) -> bytes:
    """Open a connection, send part of a request head, then nothing: what the gateway answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            writer.write(PARTIAL_HEAD)
            await writer.drain()
        finally:
            if sent is not None:
                sent.tick()
        return await asyncio.wait_for(reader.read(), deadline_s)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def legitimate(session: aiohttp.ClientSession, url: str, deadline_s: float) -> tuple[int, list[int]]:
    """GET /healthz until it answers 200; the statuses of the refusals met on the way (each must be a JSON 503)."""
    refusals: list[int] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status == 200:
                    return 200, refusals
                assert response.status == 503 and response.content_type == "application/json", response.status
                assert (await response.json())["error"]["code"] == "too_many_connections"
                assert response.headers.get("Retry-After")
                refusals.append(response.status)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            refusals.append(0)  # an early 503 may race the request's own bytes; a browser retries
        await asyncio.sleep(0.2)
    return 0, refusals


async def test_half_open_connections_past_the_fd_limit_are_refused_and_cut(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    cap, nofile, attackers = 48, 256, 300  # more half-open connections than the gateway has file descriptors
    settings = gateway_settings(
        kafka_bootstrap, topic_prefix, http_max_connections=cap, http_header_timeout_s=2.0, http_body_timeout_s=2.0
    )
    await ensure_topics(settings)
    log_path = tmp_path / "gateway.log"
    gw = GatewayProcess(settings, nofile=nofile, log_path=log_path)
    gw.start()
    port = settings.gateway_port
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            # A few slow heads below the cap: they do not stand in the way of anyone else.
            few = [asyncio.create_task(slowloris(port, 60)) for _ in range(8)]
            status, refusals = await legitimate(session, gw.url, 30)
            assert status == 200 and not refusals
            answers = await asyncio.gather(*few)
            assert [json_error(a) for a in answers] == [(408, json_error(answers[0])[1])] * len(few)
            assert json_error(answers[0])[1]["code"] == "header_timeout"

            # The flood: every connection ends with one of our answers, never with a hang.
            sent = Countdown(attackers)
            flood = [asyncio.create_task(slowloris(port, 60, sent)) for _ in range(attackers)]
            await asyncio.wait_for(sent.done.wait(), 60)  # every attacker has connected and sent its partial head
            status, refusals = await legitimate(session, gw.url, 60)
            answers = await asyncio.gather(*flood)
            assert status == 200, refusals

            # A body that never arrives: 408, not a handler waiting forever.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b'POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"prompt": ')
            await writer.drain()
            body_answer = await asyncio.wait_for(reader.readuntil(b"}}"), 60)
            writer.close()
            health = await session.get(gw.url + "/healthz")
            health.close()
    finally:
        gw.stop()
    # Past the cap a connection gets a 503 before anything is read; in a flood beyond what refusals may hold open, a
    # plain close ("closed"). The ones admitted are cut at the head timeout with a 408. None hangs.
    codes = [json_error(a)[1]["code"] if a else "closed" for a in answers]
    counts = {code: codes.count(code) for code in set(codes)}
    log_text = log_path.read_text(errors="replace")
    print(
        f"\n{attackers} half-open connections, cap {cap}, fd limit {nofile}: {counts}; {len(refusals)} refusals "
        f"before a legitimate request got through; gateway log {len(log_text)} bytes"
    )
    assert set(codes) <= {"too_many_connections", "header_timeout", "closed"}, counts
    assert counts.get("too_many_connections", 0) >= 1 and counts.get("header_timeout", 0) >= 1, counts
    assert json_error(body_answer)[0] == 408
    assert health.status == 200
    assert "Traceback" not in log_text and "out of system resource" not in log_text, log_text[-2000:]


async def test_malformed_http_gets_a_json_error_without_echo_or_error_log(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    log_path = tmp_path / "gateway.log"
    gw = GatewayProcess(settings, log_path=log_path, TOKENRELAY_LOG_LEVEL="INFO")
    gw.start()
    marker = b"ECHOMARK"
    cases = {
        "content-length and chunked": b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nX-M: " + marker + b"\r\n\r\n0\r\n\r\n",
        "obs-fold": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Folded: " + marker + b"\r\n continued\r\n\r\n",
        "100 KB header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + marker + b"h" * 100_000 + b"\r\n\r\n",
        "NUL in path": b"GET /heal\x00thz/" + marker + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "control byte in header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-C: " + marker + b"\x01\r\n\r\n",
        "bad version": b"GET /healthz/" + marker + b" HTTP/9.Z\r\nHost: x\r\n\r\n",
    }
    bodies = {
        "not JSON": b"not json " + marker,
        "an integer past Python's digit limit": b'{"prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}",
        "a truncated object": b'{"prompt": "' + marker,
    }
    try:
        answers = {what: await raw_request(settings.gateway_port, head) for what, head in cases.items()}
        async with aiohttp.ClientSession() as session:
            for what, body in bodies.items():
                async with session.post(gw.url + "/v1/requests", data=body) as response:
                    answers[what] = (response.status, dict(response.headers), await response.read())
            healthy = (await session.get(gw.url + "/healthz")).status
    finally:
        gw.stop()
    log_text = log_path.read_text(errors="replace")
    for what, (status, headers, body) in answers.items():
        assert status == 400, (what, status, body[:200])
        assert headers.get("content-type", headers.get("Content-Type", "")).startswith("application/json"), what
        error = json.loads(body)["error"]
        assert error["code"] and error["message"], what
        assert marker not in body, (what, body[:200])  # nothing of the request is echoed
        for internal in ("Expecting", "line 1 column", "4300", "digits", "sys.set_int_max_str_digits", "char 0"):
            assert internal not in error["message"], (what, error)
    assert healthy == 200
    assert "ERROR" not in log_text and "Traceback" not in log_text, log_text[-3000:]
    assert "malformed HTTP request" in log_text  # logged, at INFO

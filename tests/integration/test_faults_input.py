"""Fault tests: bad input never crashes the gateway and never costs another client a token.

Complements test_gateway_stream.py (malformed JSON, wrong types, huge bodies, malformed ids): poison records on
the events topic, garbage and forged cursors (headers, query, raw bytes), huge query strings and headers,
unknown ids, and request bodies that stress the JSON parser. Each must be a clear JSON error with the right status
(or an in-stream `reset`, or a skipped record), and /healthz must still answer afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest

from gateway.fanout.cursor import decode_cursor, encode_cursor
from schemas.codec import MAGIC, default_codec
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from services.kafka import make_producer, start_client
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    EventWriter,
    Tally,
    follow_sse,
    gateway_settings,
    metric,
    raw_request,
    read_log_streams,
    read_sse,
    running_gateway,
    scripted_stream,
    stream_text,
    tally,
    token_keys,
    wait_subscribers,
)
from tests.integration.worker_helpers import announce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def expected_tokens(n: int, run: str = "run-1") -> list[tuple[str, int, str, int]]:
    return [(run, i, f" w{i}", 1) for i in range(1, n + 1)]


async def poison(settings: Settings, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = make_producer(settings)
    await start_client(producer)
    try:
        for key, value in records:
            await producer.send(settings.events_topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def test_poison_event_records_are_skipped_and_others_keep_streaming(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)  # 4 events of memory: late reads replay from Kafka
    await ensure_topics(settings)
    victim, neighbour = new_request_id(), new_request_id()
    n = 20
    victim_events, neighbour_events = scripted_stream(victim, n), scripted_stream(neighbour, n)
    codec = default_codec()
    valid = codec.encode(victim_events[1])
    key = victim.encode()
    garbage: list[tuple[bytes | None, bytes | None]] = [
        (key, b"garbage, not avro"),
        (key, b""),
        (key, MAGIC + b"\x00" * 8 + b"body of an unknown schema"),
        (key, valid[: len(valid) // 2]),  # truncated record
        (key, valid + b"\x00trailing"),
        (key, os.urandom(100_000)),
        (key, codec.encode(neighbour_events[2])),  # decodes, but names another request
        (key, None),  # tombstone
        (b"\xff\xfe not utf-8", b"garbage"),
        (None, b"no key at all"),
    ]
    undecodable_keyed = 6  # the records above with the victim's key that cannot be decoded
    with running_gateway(settings) as gw:
        async with (
            EventWriter(settings) as writer,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            urls = {rid: f"{gw.url}/v1/requests/{rid}/events" for rid in (victim, neighbour)}
            live = {rid: asyncio.create_task(follow_sse(session, url)) for rid, url in urls.items()}
            await wait_subscribers(session, gw.url, len(live))  # both live from the first event on
            before = await metric(session, gw.url, "tokenrelay_gateway_undecodable_events_total")
            for i in range(n + 2):
                await writer.publish(victim_events[i], neighbour_events[i])
                if i in (3, 12):  # poison mid-stream, twice
                    await poison(settings, garbage)
            results = {rid: await task for rid, task in live.items()}
            late = {rid: (await read_sse(session, url))[1] for rid, url in urls.items()}
            whole = results[victim].events
            # Resume from every event of the poisoned stream: the pieces equal the whole.
            resume = Tally()
            for k in range(1, len(whole)):
                status, tail = await read_sse(session, urls[victim], cursor=whole[k - 1]["id"])
                assert status == 200
                resume.add(tally(whole[:k] + tail, whole))
            undecodable = await metric(session, gw.url, "tokenrelay_gateway_undecodable_events_total") - before
            log_streams = await read_log_streams(settings, [victim, neighbour])
            healthy = (await session.get(f"{gw.url}/healthz")).status
    live_tally, late_tally = Tally(), Tally()
    for rid in (victim, neighbour):
        live_tally.add(tally(results[rid].events, log_streams[rid]))
        late_tally.add(tally(late[rid], results[rid].events))
    print(
        f"\n{2 * len(garbage)} poison records amid 2 streams of {n} tokens: {undecodable:.0f} counted undecodable\n"
        f"  live readers against the log: {live_tally}\n  late readers (Kafka replay through the poison): "
        f"{late_tally}\n  resumes from each of {len(whole) - 1} cursors: {resume}"
    )
    for rid in (victim, neighbour):
        assert token_keys(results[rid].events) == expected_tokens(n)
        assert stream_text(results[rid].events) == "".join(f" w{i}" for i in range(1, n + 1))
    assert live_tally.clean and late_tally.clean and resume.clean, (live_tally, late_tally, resume)
    assert undecodable >= 2 * undecodable_keyed
    assert healthy == 200


def assert_json_error(status: int, body: bytes, expected: int, what: str) -> None:
    assert status == expected, (what, status, body[:200])
    error = json.loads(body)["error"]
    assert isinstance(error["code"], str) and error["code"], what
    assert isinstance(error["message"], str), what


async def test_bad_cursors_headers_queries_ids_and_bodies(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, max_body_bytes=64 * 1024)
    await ensure_topics(settings)
    await announce(settings)  # a model the gateway routes to, served by no worker
    rid = new_request_id()
    with running_gateway(settings) as gw:
        url = f"{gw.url}/v1/requests/{rid}/events"
        async with EventWriter(settings) as writer, aiohttp.ClientSession() as session:
            await writer.publish(*scripted_stream(rid, 8))
            status, whole = await read_sse(session, url)
            assert status == 200 and whole[-1]["event"] == "done"
            real = decode_cursor(whole[3]["id"])
            checked = 0

            # Malformed cursors: 400 with a JSON error, from the header and from the query.
            bad_cursors = ["garbage!", "A" * 41, "A" * 4000, "AQ==", "", " ", "AQAB", "__", "\u00e9t\u00e9"]
            bad_cursors += [encode_cursor(real) + "A", encode_cursor(real)[:-1]]
            for text in bad_cursors:
                if text.strip() == "":
                    continue  # an empty Last-Event-ID means "from the start", as for a browser
                for how in ("header", "query"):
                    if how == "header" and not text.isascii():
                        continue
                    kwargs: dict[str, object] = (
                        {"headers": {"Last-Event-ID": text}} if how == "header" else {"params": {"last_event_id": text}}
                    )
                    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
                        assert_json_error(response.status, await response.read(), 400, f"{how} cursor {text[:20]!r}")
                        checked += 1

            # Random bytes in the Last-Event-ID header, sent raw.
            rng = random.Random(5)
            high = bytes(rng.randrange(0x80, 0x100) for _ in range(24))
            for junk in (high, b"\x80\x81\xfe\xff", bytes(range(0x21, 0x7F)), b"A" * 200, b"\x00\x01\x7f"):
                raw_path = f"/v1/requests/{rid}/events".encode()
                head = b"GET " + raw_path + b" HTTP/1.0\r\nHost: x\r\nLast-Event-ID: " + junk + b"\r\n\r\n"
                status, _, body = await raw_request(settings.gateway_port, head)
                # 0x80-0xFF reach the app; control bytes are refused by aiohttp's HTTP parser: JSON 400 either way.
                assert_json_error(status, body, 400, f"raw cursor bytes {junk[:12]!r}")
                checked += 1

            # Well-formed but forged cursors: never a silent jump, never a misread position.
            wrong_epoch = encode_cursor(replace(real, epoch=(real.epoch + 1) % (1 << 16)))
            status, events = await read_sse(session, url, cursor=wrong_epoch)
            assert status == 200 and events[0]["event"] == "reset" and events[1:] == whole, events[:2]
            other_partition = encode_cursor(replace(real, partition=(real.partition + 1) % settings.events_partitions))
            status, events = await read_sse(session, url, cursor=other_partition)
            assert status == 200 and events[0]["event"] == "reset" and events[1:] == whole, events[:2]
            terminal = decode_cursor(whole[-1]["id"])
            forged_terminal = encode_cursor(replace(terminal, epoch=(terminal.epoch + 1) % (1 << 16)))
            status, events = await read_sse(session, url, cursor=forged_terminal)
            assert status == 200 and events[0]["event"] == "reset" and events[1:] == whole, (status, events[:2])
            far_partition = encode_cursor(
                replace(terminal, partition=(terminal.partition + 1) % settings.events_partitions, offset=10**9)
            )
            status, events = await read_sse(session, url, cursor=far_partition)
            assert status == 200 and events[0]["event"] == "reset" and events[1:] == whole, (status, events[:2])
            status, _ = await read_sse(session, url, cursor=whole[-1]["id"])
            assert status == 204
            checked += 5
            # Past the terminal event (a wrong check, or a future offset): nothing of this stream is there. A 400, not
            # a 204 that silently "ends" the stream, and on an unfinished request not keepalives forever.
            unfinished = new_request_id()
            await writer.publish(*scripted_stream(unfinished, 3)[:2])
            for target, beyond in [
                (url, replace(terminal, offset=terminal.offset + 1, epoch=(terminal.epoch + 1) % (1 << 16))),
                (url, replace(terminal, offset=terminal.offset + 1)),
                (url, replace(terminal, offset=10**12)),
                (
                    f"{gw.url}/v1/requests/{unfinished}/events",
                    replace(
                        terminal, partition=partition_for_key(unfinished, settings.events_partitions), offset=10**12
                    ),
                ),
            ]:
                headers = {"Last-Event-ID": encode_cursor(beyond)}
                async with session.get(target, headers=headers, timeout=aiohttp.ClientTimeout(total=20)) as response:
                    assert_json_error(response.status, await response.read(), 400, f"cursor beyond the end {beyond}")
                    checked += 1

            # Huge query strings and headers: an error with a status, not a crash or a hang.
            for target in (f"/v1/requests/{rid}/events?x=" + "a" * 100_000, "/v1/requests?" + "a=b&" * 20_000):
                verb = b"GET " if "events" in target else b"POST "
                status, headers, body = await raw_request(
                    settings.gateway_port, verb + target.encode() + b" HTTP/1.0\r\nHost: x\r\n\r\n"
                )
                assert 400 <= status < 500, (target[:40], status)
                assert_json_error(status, body, status, f"huge target {target[:40]}")
                checked += 1
            huge_header = b"GET /healthz HTTP/1.0\r\nHost: x\r\nX-Big: " + b"h" * 100_000 + b"\r\n\r\n"
            status, _, body = await raw_request(settings.gateway_port, huge_header)
            assert 400 <= status < 500
            assert_json_error(status, body, status, "huge header")
            checked += 1

            # Unknown and malformed ids on every route that takes one.
            for path, method, expected in [
                ("/v1/requests/not-an-id", "GET", 404),
                ("/v1/requests/not-an-id/cancel", "POST", 404),
                ("/v1/requests/" + "9" * 5000 + "/events", "GET", 404),
                ("/v1/requests/00000000-0000-7000-8000-000000000000", "GET", 404),
                ("/v1/requests/ffffffff-ffff-7fff-bfff-ffffffffffff/events", "GET", 404),  # from the far future
                ("/v1/nothing/here", "GET", 404),
                ("/v1/requests", "DELETE", 405),
            ]:
                async with session.request(method, gw.url + path) as response:
                    assert_json_error(response.status, await response.read(), expected, f"{method} {path[:50]}")
                    checked += 1
            # A well-formed id that no gateway accepted: unknown, at once (a request exists from its acceptance).
            async with session.get(f"{gw.url}/v1/requests/{new_request_id()}") as response:
                assert_json_error(response.status, await response.read(), 404, "unknown id")
            async with session.post(f"{gw.url}/v1/requests/{new_request_id()}/cancel") as response:
                assert_json_error(response.status, await response.read(), 404, "cancel of an unknown id")

            # Bodies that stress the parser (the basics are in test_gateway_stream.py).
            bodies: list[tuple[bytes, int, dict[str, str]]] = [
                (b'{"prompt": "\xff\xfe", "max_tokens": 3}', 400, {}),
                (b'{"prompt": "x", "temperature": NaN}', 400, {}),
                (b'{"prompt": "x", "max_tokens": Infinity}', 400, {}),
                (b"[" * 20_000 + b"]" * 20_000, 400, {}),  # deeper than the JSON parser's recursion
                (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 400, {}),
                (b"\xef\xbb\xbf{}", 400, {}),  # a BOM is not JSON
                (b'{"prompt": "x", "max_tokens": true}', 422, {}),
                (b'{"prompt": "x", "max_tokens": -1}', 422, {}),
                (b'{"prompt": "x", "seed": "1"}', 422, {}),
                (b'{"prompt": null}', 422, {}),
                (b'{"prompt": {"nested": "object"}}', 422, {}),
                (b'{"prompt": "x", "stop": "' + b"s" * 10_000 + b'"}', 422, {}),
                (b"", 400, {}),
                (b"null", 400, {}),
                (b"x" * 100_000, 413, {}),
                (b'{"prompt": "x"}', 400, {"Content-Type": "text/plain; charset=latin-1"}),
            ]
            for body, expected, headers in bodies:
                if headers:
                    # The body is read as JSON whatever the declared type; a well-formed one is then accepted.
                    async with session.post(gw.url + "/v1/requests", data=body, headers=headers) as response:
                        assert response.status in (202, 400, 415), response.status
                    continue
                async with session.post(gw.url + "/v1/requests", data=body) as response:
                    assert_json_error(response.status, await response.read(), expected, f"body {body[:40]!r}")
                    checked += 1

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(200):
                    yield b"x" * 1024

            async with session.post(gw.url + "/v1/requests", data=chunked()) as response:  # no Content-Length
                assert_json_error(response.status, await response.read(), 413, "chunked huge body")
                checked += 1

            # Still serving: health, and a fresh stream end to end.
            assert (await session.get(f"{gw.url}/healthz")).status == 200
            fresh = new_request_id()
            await writer.publish(*scripted_stream(fresh, 5))
            status, events = await read_sse(session, f"{gw.url}/v1/requests/{fresh}/events")
            assert status == 200 and token_keys(events) == expected_tokens(5)
    print(f"\n{checked} bad inputs answered with the expected status (JSON errors where the app answers)")

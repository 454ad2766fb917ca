"""Defects from the adversarial review, against a whole gateway app in-process (an in-memory log, no broker)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.api.auth import key_id
from gateway.api.backlog import BacklogMonitor
from gateway.api.responses_events import response_id
from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.source import SourceRecord
from gateway.fanout.sse import PREAMBLE, parse
from gateway.fanout.subscription import make_out
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from schemas.records import Accepted, Delta, Failed, Finished, InferenceRequest, ModelInfo, Started, TokenEvent, Usage
from schemas.view import replay
from tests.unit.gateway_app import KEY_A, KEY_B, App, live_model, running_app
from tests.unit.hub_support import MemorySource
from workers.core import owner_record

DEADLINE_S = 20.0  # no test here waits for a condition longer than this (a hang fails instead)


async def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_watch_only_token_cannot_cancel_a_background_response() -> None:
    async with running_app() as app:
        body = {"input": "hello", "background": True, "max_output_tokens": 8}
        async with app.session.post(app.url + "/v1/responses", json=body, headers=app.headers()) as r:
            assert r.status == 200, await r.text()
            created = await r.json()
        token = created["stream_token"]
        # The token watches: retrieve works without the key.
        async with app.session.get(f"{app.url}/v1/responses/{created['id']}?token={token}") as r:
            assert r.status == 200
        async with app.session.post(f"{app.url}/v1/responses/{created['id']}/cancel?token={token}") as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
        assert not [t for t, _ in app.producer.sent if t == app.gw.settings.control_topic]  # no cancel went out


class BlockingSource(MemorySource):
    """Reading starts now (so every request needs a Kafka backfill), and scans of ``blocked`` keys hang until
    ``release`` is set."""

    def __init__(self, partitions: int = 2):
        super().__init__(partitions)
        self.blocked: set[bytes] = set()
        self.release = asyncio.Event()
        self.waiting = 0

    async def start(self) -> tuple[dict[int, int], int]:
        positions, _ = await super().start()
        return positions, int(time.time() * 1000)

    async def replay(self, partition: int, from_time_ms: int, stop_offset: int, key: bytes) -> list[SourceRecord]:
        if key in self.blocked:
            self.waiting += 1
            await self.release.wait()
        return await super().replay(partition, from_time_ms, stop_offset, key)


async def test_responses_look_ups_wait_on_the_callers_own_backfill_share() -> None:
    source = BlockingSource()
    async with running_app(source, backfills=BackfillLimit(per_client=2, total=3)) as app:
        rid = new_request_id()
        tenant_b = key_id(KEY_B)
        for ev in (
            TokenEvent(rid, "", 0, 1, Accepted("default", tenant_b, None, True, True)),
            TokenEvent(rid, "r1", 0, 2, Started("w", "default", 2, 0)),
            TokenEvent(rid, "r1", 1, 3, Delta("hi", (1,))),
            TokenEvent(rid, "r1", 2, 4, Finished("stop", Usage(2, 1))),
        ):
            source.append(ev)
        unknown = [new_request_id() for _ in range(6)]
        source.blocked = {u.encode() for u in unknown}

        async def get(request_id: str, key: str) -> int:
            url = f"{app.url}/v1/responses/{response_id(request_id)}"
            async with app.session.get(url, headers=app.headers(key)) as r:
                return r.status

        flood = [asyncio.create_task(get(u, KEY_A)) for u in unknown]
        await until(lambda: source.waiting >= 2, "key A's scans did not start")
        try:
            # Key B's retrieve is on its own share: it needs no slot key A holds, so it answers while A's hang.
            assert await asyncio.wait_for(get(rid, KEY_B), DEADLINE_S) == 200
        finally:
            source.release.set()
            await asyncio.gather(*flood)


async def test_a_chat_body_under_the_limit_fits_its_record_and_what_cannot_fit_is_413() -> None:
    async with running_app(max_body_bytes=4 << 20) as app:
        turns = [{"role": "user", "content": "x" * 190_000} for _ in range(3)]  # 570 KB: under 1 MB, twice over it
        async with app.session.post(
            app.url + "/v1/requests", data=json_body({"messages": turns, "max_tokens": 4}), headers=app.headers()
        ) as r:
            assert r.status == 202, await r.text()
        async with app.session.post(
            app.url + "/v1/requests", data=json_body({"messages": turns * 3, "max_tokens": 4}), headers=app.headers()
        ) as r:
            answer = await r.json()
            assert r.status == 413 and answer["error"]["code"] == "record_too_large", answer
            assert "Retry-After" not in r.headers


def json_body(body: object) -> io.BytesIO:
    return io.BytesIO(json.dumps(body).encode())


async def test_readyz_lists_models_only_to_callers_with_a_key() -> None:
    async with running_app() as app:
        async with app.session.get(app.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body == {"status": "ready"}
        async with app.session.get(app.url + "/readyz", headers=app.headers()) as r:
            assert (await r.json())["models"] == {"default": 1}


async def test_readyz_is_not_ready_before_a_model_is_served() -> None:
    async with running_app() as app:
        now = int(time.time() * 1000)
        app.gw.models.feed(ModelInfo("default", "w1", 4096, now + 1, ttl_ms=0), now)  # the only model withdraws
        async with app.session.get(app.url + "/readyz") as r:
            assert r.status == 503 and (await r.json()) == {"status": "not_ready", "reason": "no_model"}
        app.gw.models.feed(ModelInfo("default", "w1", 4096, now + 2, ttl_ms=60_000), now)  # it comes back
        async with app.session.get(app.url + "/readyz") as r:
            assert r.status == 200


async def test_a_model_whose_request_topic_does_not_exist_is_refused_at_once() -> None:
    async with running_app() as app:
        live_model(app.gw.models, "ghost")
        monitor = BacklogMonitor(app.gw.settings)
        monitor.request_topics = {app.gw.settings.requests_topic_for("default")}
        app.gw.backlog = monitor
        app.gw.models.servable = monitor.servable
        async with app.session.post(
            app.url + "/v1/requests", json={"model": "ghost", "prompt": "x", "max_tokens": 4}, headers=app.headers()
        ) as r:
            error = (await r.json())["error"]
            assert r.status == 404 and error["code"] == "model_not_routable", error
            assert app.gw.settings.requests_topic_for("ghost") in error["message"]
        async with app.session.get(app.url + "/v1/models", headers=app.headers()) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["default"]
        assert not app.producer.sent  # nothing was parked on a topic nobody reads


async def test_a_request_whose_first_event_is_failed_shows_the_failure_to_its_tenant() -> None:
    async with running_app() as app:
        rid = new_request_id()
        # What a worker writes when it refuses a request produced straight to Kafka (no gateway, no Accepted).
        for ev in refusal_records(rid, app.tenant_a):
            app.source.append(ev)
        async with app.session.get(f"{app.url}/v1/requests/{rid}", headers=app.headers()) as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "failed", body
            assert body["error"]["code"] == "deadline_exceeded"
        async with app.session.get(f"{app.url}/v1/requests/{rid}", headers=app.headers(KEY_B)) as r:
            assert r.status == 404  # still not another tenant's to see


def refusal_records(rid: str, tenant: str) -> list[TokenEvent]:
    request = InferenceRequest(rid, "x", 4, model="default", tenant=tenant)
    owner = owner_record(request, 5)
    assert owner is not None
    return [owner, TokenEvent(rid, "run-1", 0, 6, Failed("deadline_exceeded", "too late"))]


def finished_stream(rid: str, tenant: str, text: str = "hello") -> list[TokenEvent]:
    return [
        TokenEvent(rid, "", 0, 1, Accepted("default", tenant)),
        TokenEvent(rid, "r1", 0, 2, Started("w", "default", 2, 0)),
        TokenEvent(rid, "r1", 1, 3, Delta(text, (1,))),
        TokenEvent(rid, "r1", 2, 4, Finished("stop", Usage(2, 1))),
    ]


def same_log(source: MemorySource) -> MemorySource:
    """Another gateway's view of one log (any gateway reads any partition; only its owner tails it)."""
    other = MemorySource(source.partitions)
    other.log = source.log
    return other


async def sse_events(app: App, path: str, key: str = KEY_A) -> list[dict[str, str]]:
    """The events of one SSE answer, read to its end (a stream that never ends fails the test at its deadline)."""
    async with app.session.get(app.url + path, headers=app.headers(key)) as r:
        assert r.status == 200, await r.text()
        body = await asyncio.wait_for(r.read(), DEADLINE_S)
    return [e for e in parse(body.decode()) if "event" in e]


@contextlib.asynccontextmanager
async def rogue_gateway(rid: str) -> AsyncIterator[str]:
    """A process that joined the gateways' group with its own URL: it streams any request, with text of its own,
    framed exactly as an owner frames it (cursors and all), but it does not hold the gateways' secret."""
    events = replay(rid, list(enumerate(finished_stream(rid, "", " <<INJECTED BY ROGUE GATEWAY>>"))))
    body = PREAMBLE + b"".join(make_out(partition_for_key(rid, 2), rid, ev).framed for ev in events)

    async def stream(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="text/event-stream")

    app = web.Application()
    app.router.add_get("/v1/requests/{id}/events", stream)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_a_rogue_gateway_in_the_group_cannot_get_its_text_relayed() -> None:
    rid = new_request_id()
    async with rogue_gateway(rid) as rogue, running_app(follow_from=rogue) as gateway:
        gateway.gw.tenants[rid] = gateway.tenant_a  # the client's own request
        events = await sse_events(gateway, f"/v1/requests/{rid}/events")
        assert not any("INJECTED" in e["data"] for e in events), events
        assert [e["event"] for e in events] == ["error"]
        assert json.loads(events[0]["data"])["code"] == "upstream_untrusted"


async def test_a_follower_reads_from_an_owner_that_knows_other_keys_during_a_rotation() -> None:
    rid = new_request_id()
    # Rolling key rotation: the owner has only the new key yet, the follower still has the old one first.
    async with running_app(api_keys=("key-new",)) as owner:
        for ev in finished_stream(rid, key_id("key-new")):
            owner.source.append(ev)
        async with running_app(
            same_log(owner.source), follow_from=owner.url, api_keys=("key-old", "key-new")
        ) as follower:
            events = await sse_events(follower, f"/v1/requests/{rid}/events", key="key-new")
            assert [e["event"] for e in events] == ["started", "token", "done"]
            assert json.loads(events[1]["data"])["text"] == "hello"


async def test_a_follower_that_is_refused_ends_its_clients_stream_with_an_error() -> None:
    rid = new_request_id()
    async with running_app(stream_token_secret="the owner's own secret") as owner:
        for ev in finished_stream(rid, owner.tenant_a):
            owner.source.append(ev)
        async with running_app(same_log(owner.source), follow_from=owner.url) as follower:
            events = await sse_events(follower, f"/v1/requests/{rid}/events")
            assert [e["event"] for e in events] == ["error"]
            assert json.loads(events[0]["data"])["code"] == "upstream_refused"


def test_worker_metrics_listen_on_loopback_like_everything_else() -> None:
    from services.local.broker.runner import free_port
    from services.settings import Settings
    from workers import metrics

    settings = Settings()
    assert settings.worker_metrics_host == "127.0.0.1"
    server = metrics.serve(free_port(), settings.worker_metrics_host)
    assert server is not None
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    assert metrics.serve(0, "127.0.0.1") is None  # 0: off

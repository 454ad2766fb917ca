"""A whole gateway app in-process for handler tests: an in-memory events log, a producer into it, a live model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from gateway.api.auth import Auth, key_id, stream_token_secret
from gateway.api.context import Gateway
from gateway.cluster.owners import Owners
from gateway.cluster.peers import Peers
from gateway.cluster.upstream import Follower
from gateway.fanout.backfills import BackfillLimit
from gateway.fanout.relay import Relay
from gateway.http.app import build_app
from gateway.metrics import GatewayMetrics
from schemas.codec import default_codec
from schemas.models import ModelDirectory
from schemas.records import ModelInfo
from services.local.broker.runner import free_port
from services.settings import Settings
from tests.unit.hub_support import MemorySource

KEY_A, KEY_B = "key-a", "key-b"
AIOKAFKA_MAX_REQUEST_SIZE = 1048576  # aiokafka's default max_request_size, checked before a record is sent


@dataclass
class MemoryProducer:
    """Produces into the MemorySource (events) or a list (every other topic), refusing what aiokafka refuses."""

    settings: Settings
    source: MemorySource
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    async def send_and_wait(self, topic: str, value: bytes | None, key: bytes, headers: Any = None) -> Any:
        assert value is not None, "the gateway writes no tombstones in these tests"
        if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers or []) > AIOKAFKA_MAX_REQUEST_SIZE:
            raise MessageSizeTooLargeError("The message is too large")  # as AIOKafkaProducer._serialize does
        if topic == self.settings.events_topic:
            self.source.append(default_codec().decode_event(value))
        else:
            self.sent.append((topic, value))


def live_model(directory: ModelDirectory, name: str = "default", **fields: Any) -> None:
    values: dict[str, Any] = {"context_length": 4096, "has_chat_template": True, "ttl_ms": 3_600_000}
    values.update(fields)
    directory.feed(ModelInfo(name=name, worker="w1", ts_ms=int(time.time() * 1000), **values), int(time.time() * 1000))


@dataclass
class App:
    gw: Gateway
    source: MemorySource
    producer: MemoryProducer
    url: str
    session: aiohttp.ClientSession

    def headers(self, key: str = KEY_A) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @property
    def tenant_a(self) -> str:
        return key_id(KEY_A)


@contextlib.asynccontextmanager
async def running_app(
    source: MemorySource | None = None,
    *,
    backfills: BackfillLimit | None = None,
    follow_from: str | None = None,
    **overrides: Any,
) -> AsyncIterator[App]:
    """A gateway reading every partition of ``source``; with ``follow_from`` one that reads none and follows every
    request from the gateway at that URL (as the group's map would say)."""
    values: dict[str, Any] = {"api_keys": (KEY_A, KEY_B), "stream_token_secret": "test-secret", "keepalive_s": 1.0}
    values.update(overrides)
    settings = Settings(**values)
    source = source or MemorySource(2)
    port = free_port()
    me = f"http://127.0.0.1:{port}"  # the URL this gateway advertises, as owners' proofs name it
    auth = Auth(settings)
    peers = Peers(stream_token_secret(settings), me)
    follower = None
    if follow_from is not None:
        owners = Owners(me)
        owners.update(dict.fromkeys(range(source.partitions), follow_from))
        follower = Follower(owners, peers=peers, keepalive_s=settings.keepalive_s)
    relay = Relay(source, memory_events=64, backfills=backfills, upstream=follower)
    producer = MemoryProducer(settings, source)
    directory = ModelDirectory()
    live_model(directory)
    gw = Gateway(settings, relay, producer, GatewayMetrics(), auth, models=directory, peers=peers)
    await relay.start()
    if follow_from is not None:
        relay.reassign({}, set(range(source.partitions)), 0)
    server = TestServer(build_app(gw), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield App(gw, source, producer, me, session)
    finally:
        await server.close()
        await relay.stop()
        if follower is not None:
            await follower.close()

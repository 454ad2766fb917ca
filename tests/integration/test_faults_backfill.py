"""Fault test: GETs of unknown old ids (each a Kafka scan) run one client's share at a time, not all at once."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import aiohttp
import pytest

from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from services.kafka import make_producer, start_client
from services.topics import ensure_topics
from tests.integration.gateway_support import gateway_settings, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FILLER = 50_000  # records after the old ids' time: what a scan for one of them has to read


def old_ids_on(partition: int, partitions: int, n: int, age_s: float = 120.0) -> list[str]:
    """``n`` well-formed request ids from ``age_s`` ago that hash to ``partition``; the log holds none of them."""
    out: list[str] = []
    while len(out) < n:
        rid = new_request_id(now_ms=int((time.time() - age_s) * 1000))
        if partition_for_key(rid, partitions) == partition:
            out.append(rid)
    return out


async def test_unknown_old_ids_are_bounded_per_client(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-a", "key-b"), backfill_per_client=1)
    await ensure_topics(settings)
    partition = 0
    producer = make_producer(settings)
    await start_client(producer)
    try:
        for _ in range(FILLER):
            await producer.send(settings.events_topic, os.urandom(40), key=os.urandom(8).hex().encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    ids = old_ids_on(partition, settings.events_partitions, 10)
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as session:

            async def get(rid: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
                async with session.get(f"{gw.url}/v1/requests/{rid}", headers=headers) as r:
                    return r.status, dict(r.headers), await r.json()

            flood = [get(rid, a) for rid in ids[:8]]
            answers = await asyncio.gather(*flood, get(ids[8], b))
            later = await get(ids[9], a)
            text = await (await session.get(f"{gw.url}/metrics")).text()
    counts = {
        event: float(value)
        for event, value in re.findall(r'^tokenrelay_gateway_backfills_total\{event="(\w+)"\} (\S+)$', text, re.M)
    }
    statuses = [status for status, _, _ in answers]
    print(
        f"\n8 GETs of unknown old ids by one key, 1 by another, over {FILLER} records: {statuses}; backfills {counts}"
    )
    assert statuses == [404] * 9 and later[0] == 404  # every look-up answered, none refused at this depth
    assert counts.get("started") == 10
    assert counts.get("waited_for_client", 0) >= 1  # key a's look-ups ran one at a time, queued behind each other
    assert counts.get("waited_for_slot", 0) == 0  # so key b's never waited for a slot

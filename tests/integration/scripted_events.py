"""A scripted event source: writes whole requests' TokenEvents to the real events topic with the codec."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.partitioning import partition_for_key
from schemas.records import Accepted, Delta, Failed, Finished, Started, TokenEvent, Usage
from services.kafka import producer, record_headers
from services.settings import Settings


@dataclass(frozen=True, slots=True)
class Scripted:
    events: int
    finished: int
    completion_tokens: int
    prompt_tokens: int
    by_model: dict[str, int]


def script(
    n: int, *, models: int = 2, tenants: int = 3, duplicate_finished: int = 0, failed: int = 0, accepted: bool = False
) -> tuple[list[TokenEvent], Scripted]:
    """``n`` finished requests and ``failed`` failed ones; the first ``duplicate_finished`` finish twice (a re-run).

    ``accepted``: each request's log starts with the Accepted a submit writes.
    """
    events: list[TokenEvent] = []
    completion = prompt = 0
    by_model: dict[str, int] = {}
    now = int(time.time() * 1000)
    for i in range(n + failed):
        rid, run = new_request_id(), uuid.uuid4().hex
        model, tokens = f"model-{i % models}", 2 + i % 7
        if accepted:
            events.append(TokenEvent(rid, "", 0, now, Accepted(model, tenant=f"key-{i % tenants}")))
        events.append(TokenEvent(rid, run, 0, now, Started("w", model, 5, 3 + i % 4, tenant=f"key-{i % tenants}")))
        if i >= n:
            events.append(TokenEvent(rid, run, 1, now + 5, Failed("deadline_exceeded", "too slow")))
            continue
        events.extend(TokenEvent(rid, run, k + 1, now + 10 + k, Delta("ab", (k, k + 1))) for k in range(tokens))
        done = Finished("length", Usage(5, tokens), ttft_ms=10 + i % 9, total_ms=30 + tokens * 4)
        events.append(TokenEvent(rid, run, tokens + 1, now + 20 + tokens, done))
        if i < duplicate_finished:
            rerun = uuid.uuid4().hex
            events.append(TokenEvent(rid, rerun, 0, now + 50, Started("w2", model, 5, 1)))
            events.append(TokenEvent(rid, rerun, 1, now + 60, done))
        completion += tokens
        prompt += 5
        by_model[model] = by_model.get(model, 0) + tokens
    return events, Scripted(len(events), n, completion, prompt, by_model)


def barrier(partitions: int, tag: str) -> tuple[list[TokenEvent], Scripted, set[str]]:
    """One finished request in every partition, each of its own tenant (``barrier-<tag>-<partition>``).

    Produced after other events, it is a signal: once every barrier tenant is counted, a consumer that reads each
    partition in order has applied everything produced before it, so its totals can be compared exactly.
    """
    events: list[TokenEvent] = []
    tenants: set[str] = set()
    now = int(time.time() * 1000)
    covered: set[int] = set()
    while len(covered) < partitions:
        rid = new_request_id()
        p = partition_for_key(rid, partitions)
        if p in covered:
            continue
        covered.add(p)
        tenant = f"barrier-{tag}-{p}"
        tenants.add(tenant)
        run = uuid.uuid4().hex
        events.append(TokenEvent(rid, run, 0, now, Started("w", "barrier", 5, 1, tenant=tenant)))
        events.append(TokenEvent(rid, run, 1, now + 1, Delta("ab", (1,))))
        events.append(TokenEvent(rid, run, 2, now + 2, Finished("length", Usage(5, 1), ttft_ms=1, total_ms=2)))
    return events, Scripted(len(events), partitions, partitions, 5 * partitions, {"barrier": partitions}), tenants


async def produce(settings: Settings, events: list[TokenEvent], extra_raw: list[bytes] | None = None) -> None:
    codec = default_codec()
    async with producer(settings) as p:
        for event in events:
            await p.send(
                settings.events_topic,
                codec.encode(event),
                key=event.request_id.encode(),
                headers=record_headers("TokenEvent"),
            )
        for raw in extra_raw or []:
            await p.send(settings.events_topic, raw, key=b"garbage")
        await p.flush()

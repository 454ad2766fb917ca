"""One trace across the stack: a request's spans from the gateway that took it, the worker that ran it, the worker that
continued it after a SIGKILL, and the gateways that delivered it (one owning its partition, one following it, one
resumed stream) share the client's trace id, each with the right parent; its records carry the context."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka import TopicPartition

from bench.otlp_receiver import OtlpReceiver, ReceivedSpan
from schemas.partitioning import partition_for_key
from services import tracing
from services.kafka import make_consumer, read_key, start_client
from services.settings import Settings
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    GatewayProcess,
    follow_sse,
    gateway_settings,
    read_sse,
    wait_partitions_shared,
)
from tests.integration.worker_helpers import wait_announced, wait_group_members, worker_process
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
OTHER_TRACE = "5cf92f3577b34da6a3ce929d0e0e4737"  # a client's own context on its stream request: a link, not a parent
OTHER_SPAN = "11f067aa0ba902b8"
MAX_TOKENS = 60
STEP_DELAY_S = "0.06"  # ≥ 3.6 s per generation: the kill lands mid-generation
SESSION_TIMEOUT_MS = "6000"


@contextlib.contextmanager
def workers(settings: Settings, model_dir: Path, env: dict[str, str]) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    with contextlib.ExitStack() as stack:
        procs = {}
        for name in ("w1", "w2"):
            procs[name] = stack.enter_context(
                worker_process(
                    settings,
                    "tests.integration.slow_worker",
                    TOKENRELAY_MODEL=str(model_dir),
                    TOKENRELAY_SERVED_NAME=settings.served_model,
                    TOKENRELAY_DEVICE="cpu",
                    TOKENRELAY_WORKER_METRICS_PORT="0",
                    TOKENRELAY_WORKER_ID=name,
                    TOKENRELAY_WORKER_SESSION_TIMEOUT_MS=SESSION_TIMEOUT_MS,
                    TOKENRELAY_TEST_STEP_DELAY_S=STEP_DELAY_S,
                    **env,
                )
            )
        yield procs


def of_request(receiver: OtlpReceiver, request_id: str) -> list[ReceivedSpan]:
    return [s for s in receiver.received() if s.attributes.get("tokenrelay.request_id") == request_id]


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


async def record_traces(settings: Settings, request_id: str) -> list[tuple[str, str | None]]:
    """(what, trace id) of every record of the request in the events topic."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        tp = TopicPartition(settings.events_topic, partition_for_key(request_id, settings.events_partitions))
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        found = []
        async for record in read_key(consumer, tp, request_id.encode(), 0, end):
            content_type = dict(record.headers).get("content-type", b"").decode()
            found.append((content_type, tracing.trace_id_of(tracing.record_trace(record.headers))))
        return found
    finally:
        await consumer.stop()


async def test_one_trace_from_submit_through_a_worker_kill_to_every_delivering_gateway(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    with OtlpReceiver() as receiver:
        gateways = [GatewayProcess(gateway_settings(kafka_bootstrap, topic_prefix)) for _ in range(2)]
        for i, gw in enumerate(gateways):
            gw.env = receiver.env(OTEL_RESOURCE_ATTRIBUTES=f"service.instance.id=gw{i}")
        try:
            with workers(settings, tiny_model_dir, receiver.env()) as procs:
                await asyncio.gather(*(gw.start_async() for gw in gateways))
                await wait_announced(settings, settings.served_model)
                await wait_group_members(settings, 2)
                for gw in gateways:
                    await gw.wait_serving()
                a, b = (gw.url for gw in gateways)
                async with aiohttp.ClientSession() as session:
                    await wait_partitions_shared(session, [a, b], partitions=settings.events_partitions)
                    body = {"prompt": "The quick brown fox", "max_tokens": MAX_TOKENS, "temperature": 0}
                    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "k=v"}
                    async with session.post(f"{a}/v1/requests", json=body, headers=headers) as response:
                        assert response.status == 202, await response.text()
                        rid = (await response.json())["id"]
                    url = "/v1/requests/" + rid + "/events"
                    other = {"traceparent": f"00-{OTHER_TRACE}-{OTHER_SPAN}-01"}
                    streams = [
                        asyncio.create_task(follow_sse(session, a + url, deadline_s=120)),
                        asyncio.create_task(follow_sse(session, b + url, deadline_s=120, headers=other)),
                    ]

                    # The worker that runs it: known once its prefill span (ended at the first token) is exported.
                    async def prefilled() -> str:
                        spans = named(of_request(receiver, rid), tracing.PREFILL)
                        return str(spans[0].attributes["tokenrelay.worker"]) if spans else ""

                    victim = await wait_until(prefilled, "the first run's prefill span", timeout_s=60)
                    procs[victim].send_signal(signal.SIGKILL)
                    procs[victim].wait()
                    seen = await asyncio.gather(*streams)
                    for stream in seen:
                        assert stream.complete and stream.events[-1]["event"] == "done", stream.events[-3:]
                    first_token = next(e for e in seen[0].events if e["event"] == "token")
                    status, resumed = await read_sse(session, b + url, cursor=first_token["id"])
                    assert status == 200 and resumed[-1]["event"] == "done"
                    done = json.loads(seen[0].events[-1]["data"])

                async def complete() -> list[ReceivedSpan]:
                    spans = of_request(receiver, rid)
                    done = named(spans, tracing.PUBLISH) and len(named(spans, tracing.FIRST_BYTE)) == 3
                    return spans if done else []

                spans: list[ReceivedSpan] = await wait_until(complete, lambda: f"every span of {rid}", timeout_s=30)
                records = await record_traces(settings, rid)
        finally:
            for gw in gateways:
                gw.stop()

    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    (submit,) = named(spans, tracing.SUBMIT)
    assert submit.parent_id == CLIENT_SPAN and submit.resource["service.instance.id"] == "gw0"
    assert submit.service == "tokenrelay-gateway" and submit.attributes["gen_ai.request.max_tokens"] == MAX_TOKENS
    for span in spans:
        if span is not submit:
            assert span.parent_id == submit.span_id, span

    # The killed worker's run and the continuation, each with its queue wait and prefill; the continuation names it.
    survivor = "w2" if victim == "w1" else "w1"
    queues = {s.attributes["tokenrelay.worker"]: s for s in named(spans, tracing.QUEUE_WAIT)}
    prefills = {s.attributes["tokenrelay.worker"]: s for s in named(spans, tracing.PREFILL)}
    assert set(queues) == set(prefills) == {victim, survivor}
    assert (
        queues[survivor].attributes["tokenrelay.continues_run_id"] == prefills[victim].attributes["tokenrelay.run_id"]
    )
    assert all(s.service == "tokenrelay-worker" for s in (*queues.values(), *prefills.values()))
    (decode,) = named(spans, tracing.DECODE)  # the victim's decode never ended: it died with it
    (publish,) = named(spans, tracing.PUBLISH)
    assert decode.attributes["tokenrelay.worker"] == publish.attributes["tokenrelay.worker"] == survivor
    assert decode.attributes["gen_ai.usage.output_tokens"] == done["usage"]["completion_tokens"]
    assert decode.attributes["gen_ai.response.finish_reasons"] == (done["finish_reason"],)
    assert prefills[survivor].end_ns <= decode.start_ns <= decode.end_ns <= publish.start_ns

    # Delivery: gw0 and gw1 each streamed it (one reads its partition, the other follows it), gw1 resumed it too.
    firsts = named(spans, tracing.FIRST_BYTE)
    live = sorted(
        (s for s in firsts if not s.attributes["tokenrelay.resumed"]), key=lambda s: s.resource["service.instance.id"]
    )
    (again,) = (s for s in firsts if s.attributes["tokenrelay.resumed"])
    assert [s.resource["service.instance.id"] for s in live] == ["gw0", "gw1"]
    assert sorted(s.attributes["tokenrelay.followed"] for s in live) == [False, True]
    assert all(s.attributes["tokenrelay.first_event"] == "token" for s in firsts)
    assert live[1].links == ((OTHER_TRACE, OTHER_SPAN),) and live[0].links == ()
    assert again.resource["service.instance.id"] == "gw1"

    # Every record of the request carries the context: the gateway's Accepted, and both runs' events.
    assert len(records) > MAX_TOKENS // 8 and {trace for _, trace in records} == {CLIENT_TRACE}, records

"""The Responses API through the official openai SDK: background streams resumed across a killed gateway, and more."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from gateway.api.responses import request_id_of_response
from gateway.api.responses_events import response_id
from schemas.ids import new_request_id
from services.local.broker.cluster import free_port_block
from services.topics import ensure_topics
from tests.integration.gateway_support import (
    gateway_settings,
    read_log_streams,
    read_sse,
    running_gateway,
    running_worker,
)
from tests.integration.secure_support import SECURE_TOO

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

TERMINAL = ("response.completed", "response.incomplete", "response.failed", "response.cancelled")


def client(url: str, key: str = "key-one") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def deltas(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def read_all(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def until_ended(api: openai.AsyncOpenAI, rid: str, deadline_s: float = 120.0) -> Any:
    """Poll the response, as a background client does, until it leaves queued/in_progress."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        response = await api.responses.retrieve(rid)
        if response.status not in ("queued", "in_progress"):
            return response
        await asyncio.sleep(0.1)
    raise AssertionError(f"response {rid} still {response.status} after {deadline_s} s")


@SECURE_TOO
async def test_background_stream_resumes_after_the_gateway_is_killed(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-one", "key-two"))
    other_settings = dataclasses.replace(settings, gateway_port=free_port_block(1))
    await ensure_topics(settings)
    with (
        running_gateway(settings) as gw,
        running_gateway(other_settings) as other,
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="20"),
    ):
        api = client(gw.url)
        stream = await api.responses.create(
            model="default", input="tell me a story", background=True, stream=True, max_output_tokens=40
        )
        before: list[Any] = []
        async for event in stream:
            before.append(event)
            if sum(e.type == "response.output_text.delta" for e in before) == 3:
                break
        await stream.close()  # the client drops the connection mid-stream
        await api.close()
        created = before[0]
        assert created.type == "response.created" and created.response.status == "queued"
        rid = created.response.id
        assert created.response.background is True
        last_seq = before[-1].sequence_number
        assert [e.sequence_number for e in before] == list(range(len(before)))

        gw.kill()  # SIGKILL: nothing of the gateway's memory survives
        gw.start()
        api = client(gw.url)
        after = await read_all(await api.responses.retrieve(rid, stream=True, starting_after=last_seq))
        assert [e.sequence_number for e in after] == list(range(last_seq + 1, last_seq + 1 + len(after)))
        assert after[-1].type == "response.incomplete"  # max_output_tokens reached
        whole = await api.responses.retrieve(rid)
        assert whole.status == "incomplete" and whole.incomplete_details is not None
        assert deltas(before) + deltas(after) == whole.output_text != ""

        # The same events, numbered the same, from another gateway that never saw the request's stream.
        other_api = client(other.url)
        replayed = await read_all(await other_api.responses.retrieve(rid, stream=True))
        await other_api.close()
        assert [e.sequence_number for e in replayed] == list(range(len(replayed)))
        assert [e.model_dump() for e in replayed[last_seq + 1 :]] == [e.model_dump() for e in after]
        assert [e.model_dump() for e in replayed[: last_seq + 1]] == [e.model_dump() for e in before]
        assert deltas(replayed) == whole.output_text

        # Usage is the worker's Finished event, as the log holds it.
        request_id = request_id_of_response(rid)
        done = (await read_log_streams(settings, [request_id]))[request_id][-1]
        assert done["event"] == "done"
        usage = json.loads(done["data"])["usage"]
        assert whole.usage is not None and after[-1].response.usage.output_tokens == usage["completion_tokens"]
        assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert (
            whole.usage.total_tokens == usage["prompt_tokens"] + usage["completion_tokens"]
            and usage["completion_tokens"] == 40
        )

        # Resuming after the end answers the remaining nothing and closes; resuming mid-way after the end works too.
        assert await read_all(await api.responses.retrieve(rid, stream=True, starting_after=len(replayed) + 5)) == []
        tail = await read_all(await api.responses.retrieve(rid, stream=True, starting_after=len(replayed) - 3))
        assert [e.model_dump() for e in tail] == [e.model_dump() for e in replayed[-2:]]
        await api.close()


async def test_create_retrieve_cancel_keys_and_refusals(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-one", "key-two"))
    await ensure_topics(settings)
    with (
        running_gateway(settings) as gw,
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="50"),
    ):
        api, intruder = client(gw.url), client(gw.url, "key-two")

        whole = await api.responses.create(
            model="default",
            instructions="be brief",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            max_output_tokens=6,
            metadata={"ticket": "42"},
        )
        assert whole.status == "incomplete" and whole.usage is not None and whole.usage.output_tokens == 6
        assert whole.output_text and whole.metadata == {"ticket": "42"}
        assert (await api.responses.retrieve(whole.id)).output_text == whole.output_text

        queued = await api.responses.create(model="default", input="later", background=True, max_output_tokens=5)
        assert queued.status in ("queued", "in_progress") and queued.background
        ended = await until_ended(api, queued.id)
        assert ended.status == "incomplete" and ended.output_text
        # Resume after completion: the rest from any number, the same every time.
        events = await read_all(await api.responses.retrieve(queued.id, stream=True))
        assert events[-1].type == "response.incomplete" and deltas(events) == ended.output_text
        assert [
            e.model_dump()
            for e in await read_all(await api.responses.retrieve(queued.id, stream=True, starting_after=4))
        ] == [e.model_dump() for e in events[5:]]

        # A browser's EventSource: a stream token instead of the key, Last-Event-ID to resume, 204 after the end.
        token = queued.to_dict()["stream_token"]
        url = f"{gw.url}/v1/responses/{queued.id}?stream=true&token={token}"
        async with aiohttp.ClientSession() as session:
            status, tail = await read_sse(session, url, headers={"Last-Event-ID": str(len(events) - 3)})
            assert status == 200 and [json.loads(e["data"]) for e in tail] == [e.to_dict() for e in events[-2:]]
            async with session.get(url, headers={"Last-Event-ID": str(len(events) - 1)}) as answer:
                assert answer.status == 204

        # Cancel a background response mid-way; a second cancel answers the same final object.
        long = await api.responses.create(model="default", input="go on", background=True, max_output_tokens=1000)
        cancelled = await api.responses.cancel(long.id)
        assert cancelled.status == "cancelled"
        assert (await api.responses.cancel(long.id)).status == "cancelled"
        assert (await api.responses.retrieve(long.id)).status == "cancelled"
        # A foreground response cannot be cancelled by id: its client holds it.
        with pytest.raises(openai.ConflictError):
            await api.responses.cancel(whole.id)

        # A foreground stream whose client leaves is cancelled; a background one keeps running (see above).
        fg = await api.responses.create(model="default", input="x", stream=True, max_output_tokens=1000)
        seen: list[Any] = []
        async for event in fg:
            seen.append(event)
            if event.type == "response.output_text.delta":
                break
        await fg.close()
        assert (await until_ended(api, seen[0].response.id)).status == "cancelled"

        # Another key sees nothing: retrieve, resume and cancel answer as for an unknown id.
        for call in (
            intruder.responses.retrieve(whole.id),
            intruder.responses.retrieve(queued.id, stream=True, starting_after=1),
            intruder.responses.cancel(queued.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await call
        old_unknown = response_id(new_request_id(int(time.time() * 1000) - 3_600_000))
        for unknown in (old_unknown, "resp_nothing", "resp_" + "f" * 32):
            with pytest.raises(openai.NotFoundError):
                await api.responses.retrieve(unknown)
        # Past the retention window the log cannot hold a response's beginning: refused with its own code.
        with pytest.raises(openai.NotFoundError) as expired:
            await api.responses.retrieve(response_id(new_request_id(int(time.time() * 1000) - 2 * 86_400_000)))
        assert expired.value.code == "expired"

        # store=false: answered once, not kept for reading back.
        unstored = await api.responses.create(model="default", input="x", store=False, max_output_tokens=2)
        assert unstored.status == "incomplete" and unstored.to_dict()["store"] is False
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(unstored.id)

        # What is not implemented is refused with a code, never ignored.
        refused: list[dict[str, Any]] = [
            {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
            {"reasoning": {"effort": "high"}},
            {"include": ["reasoning.encrypted_content"]},
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        ]
        for extra in refused:
            with pytest.raises(openai.BadRequestError) as caught:
                await api.responses.create(**{"model": "default", "input": "x", **extra})
            assert caught.value.code == "unsupported_parameter"
        await api.close()
        await intruder.close()

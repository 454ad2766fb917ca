"""A backend producer's view: put a request straight onto the requests topic and follow its events in the log."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import assert_never

from aiokafka import TopicPartition

from schemas.errors import ConfigError
from schemas.ids import CLOCK_SKEW_MS, request_id_time_ms
from schemas.models import LiveModel, ModelDirectory
from schemas.partitioning import partition_for_key
from schemas.records import ChatMessage
from schemas.sampling import SamplingParams
from schemas.view import EventName, View, ViewEvent
from services.kafka import make_consumer, make_producer, read_key, start_client
from services.models_source import ModelsFollower
from services.requests import new_inference_request, submit_request
from services.schema_registry import prepare_codec, reading_codec
from services.settings import Settings
from services.topics import describe_topics

MODELS_WAIT_S = 10.0


async def submit(
    settings: Settings,
    prompt: str,
    sampling: SamplingParams,
    follow: bool,
    *,
    chat: bool | None = None,
    model: str = "",
    priority: str = "interactive",
) -> int:
    """Produce one request, print its id; with ``follow`` print its text as it arrives. Exit code 0 on success.

    ``sampling`` comes checked (``SamplingParams.check``). ``chat`` sends the prompt as one user turn, which the worker
    renders with the model's chat template; None: chat when the model announces a chat template.
    """
    info = await _live_model(settings, model)
    name = info.name if info is not None else model or settings.default_model
    topic = settings.requests_topic_for(name, priority)
    if info is None:
        if not (await describe_topics(settings, [topic]))[topic]:
            raise ConfigError(
                f"no worker serves model {name!r} (topic {topic} does not exist); `/v1/models` lists the live ones"
            )
        print(f"no worker announces {name!r} right now; the request waits on {topic}", file=sys.stderr)
    # Chat unless told otherwise, when the model has a chat template (or is not announced to say it has none).
    as_chat = (info is None or info.has_chat_template) if chat is None else chat
    messages = (ChatMessage("user", prompt),) if as_chat else None
    request = new_inference_request(prompt, sampling, "", messages, model=name, priority=priority)
    request_id = request.request_id
    codec = await prepare_codec(settings, [topic, settings.events_topic])
    producer = make_producer(settings)
    await start_client(producer)
    try:
        await submit_request(producer, settings, codec, request)  # the request on `topic`, then its Accepted
        partitions = len(await producer.partitions_for(settings.events_topic))
    finally:
        await producer.stop()
    print(request_id, flush=True)
    if not follow:
        return 0
    return await follow_events(settings, request_id, partitions)


async def _live_model(settings: Settings, requested: str) -> LiveModel | None:
    """The live model a request goes to, as the gateway resolves it; None when none is announced."""
    follower = ModelsFollower(make_consumer(settings), settings.models_topic, ModelDirectory(), reading_codec(settings))
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.caught_up.wait(), MODELS_WAIT_S)
    except TimeoutError:
        return None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return follower.directory.resolve(requested, settings.default_model, int(time.time() * 1000))


async def follow_events(settings: Settings, request_id: str, partitions: int) -> int:
    """Print a request's text from the events log until its terminal event; a restarted run is announced."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:
        tp = TopicPartition(settings.events_topic, partition_for_key(request_id, partitions))
        consumer.assign([tp])
        codec = reading_codec(settings)
        view = View(request_id)  # the gateway's own fold of the log: fenced runs, gaps and refusals as clients see them
        records = read_key(consumer, tp, request_id.encode(), request_id_time_ms(request_id) - CLOCK_SKEW_MS)
        async with contextlib.aclosing(records):
            async for record in records:
                out = view.feed(record.offset, codec.decode_event(record.value or b""))
                if out is None:
                    continue
                if (code := print_event(out)) is not None:
                    return code
        return 1  # not reached: the follow ends only at a terminal event
    finally:
        await consumer.stop()


def print_event(event: ViewEvent) -> int | None:
    """Print one view event of a followed request: its text, a restart, its end; the exit code at the end."""
    data = event.data
    match event.event:
        case EventName.STARTED:
            sys.stdout.write(data.get("text", ""))
        case EventName.RESTART:
            print("\n[restarted]", flush=True)
            sys.stdout.write(data["text"])
        case EventName.TOKEN:
            sys.stdout.write(data["text"])
            sys.stdout.flush()
        case EventName.DONE:
            usage = data["usage"]
            print(f"\n[{data['finish_reason']}: {usage['completion_tokens']} tokens]", flush=True)
            return 0
        case EventName.ERROR:
            hint = " (send it as raw text with --no-chat)" if data["code"] == "chat_template_missing" else ""
            print(f"\n[failed: {data['code']}: {data['message']}{hint}]", file=sys.stderr, flush=True)
            return 1
        case EventName.RESET:
            pass  # the relay's frame for a cursor that cannot resume: a fold of the log makes none
        case _:
            assert_never(event.event)
    return None

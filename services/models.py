"""What the workers serve now: the newest live announcement per model on the compacted models topic."""

from __future__ import annotations

import time
from collections.abc import Iterable

from aiokafka import TopicPartition

from schemas.codec import default_codec
from schemas.errors import DecodeError
from schemas.records import ModelInfo
from services.kafka import make_consumer, start_client
from services.settings import Settings

_POLL_MS = 200


def live_models(infos: Iterable[ModelInfo], now_ms: int) -> dict[str, ModelInfo]:
    """The newest announcement of each model (``infos`` in log order), kept only while it is live."""
    newest: dict[str, ModelInfo] = {}
    for info in infos:
        newest[info.name] = info
    return {name: info for name, info in newest.items() if info.live(now_ms)}


async def read_models(settings: Settings) -> dict[str, ModelInfo]:
    """Read the models topic from its start to its end; the live models by name (empty if the topic is missing)."""
    consumer = make_consumer(settings, client_id="tokenrelay-models")
    await start_client(consumer)
    try:
        await consumer.topics()  # a fresh client knows no topics: this fetches the cluster's metadata
        partitions = consumer.partitions_for_topic(settings.models_topic) or set()
        tps = [TopicPartition(settings.models_topic, p) for p in sorted(partitions)]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        codec = default_codec()
        infos: list[ModelInfo] = []
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=_POLL_MS)).items():
                for record in records:
                    if record.value is not None:
                        try:
                            infos.append(codec.decode_model_info(record.value))
                        except DecodeError:
                            continue
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return live_models(infos, int(time.time() * 1000))
    finally:
        await consumer.stop()

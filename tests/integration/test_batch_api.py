"""The Batch API with the official openai SDK against the real stack: files in, batches run, output files out."""

from __future__ import annotations

import openai
import pytest

from services.topics import ensure_topics
from tests.integration.batch_support import (
    chat_line,
    custom_id_counts,
    jsonl,
    read_file_lines,
    wait_batch,
)
from tests.integration.gateway_support import gateway_settings, running_gateway, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SYNTHETIC = {"TOKENRELAY_ENGINE": "synthetic", "TOKENRELAY_SYNTHETIC_TOKENS_PER_S": "400"}


async def test_a_small_batch_runs_to_its_output_file(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-one", "key-two"))
    await ensure_topics(settings)
    with running_gateway(settings) as gw, running_worker(settings, **SYNTHETIC):
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="key-one", max_retries=0, timeout=60)
        lines = [chat_line(i) for i in range(20)]
        file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        assert file.bytes == len(jsonl(lines)) and file.purpose == "batch"
        batch = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"a": "b"}
        )
        assert batch.status == "validating" and batch.metadata == {"a": "b"}
        done = await wait_batch(client, batch.id)
        assert done.status == "completed", done
        assert done.request_counts is not None and done.request_counts.completed == 20
        out = await read_file_lines(client, done.output_file_id)
        assert custom_id_counts(out) == {f"line-{i}": 1 for i in range(20)}
        assert all(line["response"]["status_code"] == 200 for line in out)
        await client.close()

"""The real default model end to end: gateway → Kafka → worker → Kafka → SSE, greedy text equal to transformers'."""

from __future__ import annotations

import json

import aiohttp
import pytest

from services.topics import ensure_topics
from tests.integration.gateway_support import gateway_settings, read_sse, running_gateway, running_worker
from workers.model.registry import ensure_default_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPT = "The worker reads a request from the topic and"
MAX_TOKENS = 24


def greedy_reference(prompt: str, max_tokens: int) -> tuple[int, list[int], str]:
    """Greedy completion by plain transformers `generate` on the default model, with its own tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = ensure_default_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ids = [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]  # the engine does not emit the end-of-sequence token
    return int(inputs["input_ids"].shape[1]), ids, str(tokenizer.decode(ids, skip_special_tokens=True))


async def test_default_model_greedy_stream_equals_transformers(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    prompt_tokens, expected_ids, expected_text = greedy_reference(PROMPT, MAX_TOKENS)
    assert expected_text.strip()
    with running_gateway(settings) as gw, running_worker(settings, TOKENRELAY_MODEL="default", TOKENRELAY_DEVICE="cpu"):
        async with aiohttp.ClientSession() as session:
            body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            async with session.post(gw.url + "/v1/requests", json=body) as r:
                assert r.status == 202
                answer = await r.json()
            status, events = await read_sse(session, gw.url + answer["events_url"], timeout_s=180)
    assert status == 200
    assert events[0]["event"] == "started" and events[-1]["event"] == "done"
    tokens = [json.loads(e["data"]) for e in events if e["event"] == "token"]
    ids = [t for data in tokens for t in data["token_ids"]]
    text = "".join(data["text"] for data in tokens)
    done = json.loads(events[-1]["data"])
    assert ids == expected_ids
    assert text == expected_text
    assert done["usage"]["completion_tokens"] == len(expected_ids)
    assert done["finish_reason"] == ("length" if len(expected_ids) == MAX_TOKENS else "stop")
    started = json.loads(events[0]["data"])
    assert done["usage"]["prompt_tokens"] == started["prompt_tokens"] == prompt_tokens

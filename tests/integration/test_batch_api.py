"""The Batch API with the official openai SDK against the real stack: files in, batches run, output files out."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.batch.driver import lines_topic
from gateway.batch.objects import batch_uuid, line_request_id
from services.topics import ensure_topics
from tests.integration.batch_support import (
    TERMINAL,
    chat_line,
    completion_line,
    custom_id_counts,
    jsonl,
    keys_on_topic,
    read_file_lines,
    response_line,
    stored_batch,
    wait_batch,
    without_volatile,
)
from tests.integration.gateway_support import ROOT, GatewayProcess, gateway_settings, running_gateway, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KEYS = ("key-one", "key-two")
SYNTHETIC = {"TOKENRELAY_ENGINE": "synthetic", "TOKENRELAY_SYNTHETIC_TOKENS_PER_S": "400"}
# One token per 50 ms per request: a batch of a few hundred lines runs for seconds, long enough to act mid-batch.
SLOW_SYNTHETIC = {"TOKENRELAY_ENGINE": "synthetic", "TOKENRELAY_SYNTHETIC_TOKENS_PER_S": "20"}


def client_of(url: str, key: str = "key-one") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


async def run_batch(client: openai.AsyncOpenAI, lines: list[dict[str, Any]], endpoint: str) -> Any:
    file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    return await wait_batch(client, batch.id)


async def direct_answer(client: openai.AsyncOpenAI, line: dict[str, Any]) -> dict[str, Any]:
    """What the line's endpoint answers for the line's body, called one by one over HTTP."""
    path = line["url"].removeprefix("/v1")
    answer = await client.post(path, body=line["body"], cast_to=object)
    assert isinstance(answer, dict)
    return answer


@pytest.mark.slow
async def test_1000_lines_each_answered_as_its_endpoint_answers(kafka_bootstrap: str, topic_prefix: str) -> None:
    """The built-in model, greedy: every custom_id once, and each body is what the endpoint returns for the line."""
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS)
    await ensure_topics(settings)
    with running_gateway(settings) as gw, running_worker(settings, TOKENRELAY_ENGINE="model"):
        client = client_of(gw.url)
        lines = [chat_line(i) for i in range(1000)]
        done = await run_batch(client, lines, "/v1/chat/completions")
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (1000, 1000, 0)
        assert done.error_file_id is None
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        out = await read_file_lines(client, done.output_file_id)
        assert custom_id_counts(out) == {line["custom_id"]: 1 for line in lines}
        by_custom_id = {line["custom_id"]: line for line in out}
        for line in lines[::50]:  # 20 of them, one by one through the endpoint
            got = by_custom_id[line["custom_id"]]["response"]
            assert got["status_code"] == 200
            assert without_volatile(got["body"]) == without_volatile(await direct_answer(client, line))
        assert done.usage is not None and done.usage.output_tokens == sum(
            line["response"]["body"]["usage"]["completion_tokens"] for line in out
        )

        for make, endpoint in ((completion_line, "/v1/completions"), (response_line, "/v1/responses")):
            small = [make(i) for i in range(8)]
            done = await run_batch(client, small, endpoint)
            assert done.status == "completed", done
            out = await read_file_lines(client, done.output_file_id)
            assert custom_id_counts(out) == {line["custom_id"]: 1 for line in small}
            for line, got in zip(small, sorted(out, key=lambda o: int(o["custom_id"].split("-")[1])), strict=True):
                assert without_volatile(got["response"]["body"]) == without_volatile(await direct_answer(client, line))
        await client.close()


async def test_cancel_mid_batch_keeps_the_finished_lines(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS)
    await ensure_topics(settings)
    with running_gateway(settings) as gw, running_worker(settings, **SLOW_SYNTHETIC, TOKENRELAY_MAX_BATCH_SIZE="8"):
        client = client_of(gw.url)
        lines = [chat_line(i, max_tokens=10) for i in range(120)]
        file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        running = await wait_batch(client, batch.id, completed_at_least=8)
        assert running.status == "in_progress"
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        done = await wait_batch(client, batch.id)
        assert done.status == "cancelled" and done.cancelled_at, done
        out = await read_file_lines(client, done.output_file_id)
        errors = await read_file_lines(client, done.error_file_id)
        assert len(out) >= 8 and errors, (len(out), len(errors))
        assert custom_id_counts(out, errors) == {line["custom_id"]: 1 for line in lines}
        assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        assert all(e["response"] is None for e in errors)
        assert done.request_counts is not None and done.request_counts.completed == len(out)
        again = await client.batches.cancel(batch.id)  # cancelling a cancelled batch answers it as it is
        assert again.status == "cancelled"
        await client.close()


async def test_bad_lines_are_refused_with_their_numbers_and_keys_see_only_their_own(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS)
    await ensure_topics(settings)
    with running_gateway(settings) as gw, running_worker(settings, **SYNTHETIC):
        client, other = client_of(gw.url), client_of(gw.url, "key-two")
        bad = jsonl([chat_line(0), {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}])
        bad += b"not json\n" + jsonl([chat_line(3, max_tokens=-1), chat_line(0)])
        with pytest.raises(openai.BadRequestError) as refused:
            await client.files.create(file=("bad.jsonl", bad), purpose="batch")
        message = refused.value.message
        for expected in ("line 2: messages", "line 3: this line is not valid JSON", "line 4: max_tokens", "line 5:"):
            assert expected in message, message
        assert "line 1" not in message

        # Lines that are fine alone but not for the batch's endpoint: the batch fails validation, line by line.
        file = await client.files.create(
            file=("mixed.jsonl", jsonl([chat_line(0), completion_line(1), completion_line(2)])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        failed = await wait_batch(client, batch.id)
        assert failed.status == "failed" and failed.failed_at and failed.errors and failed.errors.data
        assert [(e.line, e.code, e.param) for e in failed.errors.data] == [
            (2, "mismatched_endpoint", "url"),
            (3, "mismatched_endpoint", "url"),
        ]

        # Another key: every call about these ids is a 404, and its lists are empty.
        for call in (
            other.files.retrieve(file.id),
            other.files.content(file.id),
            other.files.delete(file.id),
            other.batches.retrieve(batch.id),
            other.batches.cancel(batch.id),
            other.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"),
        ):
            with pytest.raises(openai.NotFoundError):
                await call
        assert [f async for f in other.files.list()] == []
        assert [b async for b in other.batches.list()] == []
        assert [b.id async for b in client.batches.list()] == [batch.id]
        assert file.id in [f.id async for f in client.files.list()]
        deleted = await client.files.delete(file.id)
        assert deleted.deleted and deleted.id == file.id
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(file.id)
        await client.close()
        await other.close()


async def test_a_gateway_and_a_worker_sigkilled_mid_batch_lose_and_double_nothing(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The driving gateway dies mid-submit and a worker mid-run: another gateway continues; each line once."""
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS, batch_submit_chunk=16)
    await ensure_topics(settings)
    first = GatewayProcess(settings)
    first.start()
    try:
        with (
            running_worker(settings, **SLOW_SYNTHETIC) as doomed,
            running_worker(settings, **SLOW_SYNTHETIC),
        ):
            client = client_of(first.url)
            lines = [chat_line(i, max_tokens=6) for i in range(400)]
            file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            await client.files.delete(file.id)  # the batch has what it needs: a gateway that takes over reads it too
            await wait_batch(client, batch.id, until=("in_progress", *TERMINAL), timeout_s=60)
            first.kill()  # mid-submit: the cursor moves every 16 lines
            await client.close()
            assert (await stored_batch(settings, batch.id)).submitted < len(lines)  # killed before it submitted all
            with running_gateway(settings) as second:
                client = client_of(second.url)
                await wait_batch(client, batch.id, completed_at_least=40)
                doomed.send_signal(signal.SIGKILL)
                done = await wait_batch(client, batch.id)
                assert done.status == "completed", done
                out = await read_file_lines(client, done.output_file_id)
                assert custom_id_counts(out) == {line["custom_id"]: 1 for line in lines}
                for line in out:
                    body = line["response"]["body"]
                    assert body["choices"][0]["message"]["content"] == " lorem ipsum dolor sit amet consectetur"
                    assert body["usage"]["completion_tokens"] == 6
                created_ms = int(batch_uuid(batch.id).replace("-", "")[:12], 16)
                ids = {line_request_id(batch.id, i + 1, created_ms).encode() for i in range(len(lines))}
                submitted = await keys_on_topic(settings, lines_topic(settings, "default"), ids)
                assert sorted(submitted.values()) == [1] * len(lines)  # every line on its topic exactly once
                await client.close()
    finally:
        first.stop()


async def test_a_batch_past_its_window_expires_with_the_rest_in_the_error_file(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS, batch_window_s=4)
    await ensure_topics(settings)
    with running_gateway(settings) as gw, running_worker(settings, **SLOW_SYNTHETIC, TOKENRELAY_MAX_BATCH_SIZE="4"):
        client = client_of(gw.url)
        lines = [chat_line(i, max_tokens=10) for i in range(60)]
        done = await run_batch(client, lines, "/v1/chat/completions")
        assert done.status == "expired" and done.expired_at and done.expires_at == done.created_at + 4, done
        out = await read_file_lines(client, done.output_file_id)
        errors = await read_file_lines(client, done.error_file_id)
        assert custom_id_counts(out, errors) == {line["custom_id"]: 1 for line in lines}
        assert out and errors
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
        assert json.dumps(errors[0]["error"]["message"]).startswith('"This request could not be executed')
        await client.close()


async def test_the_command_line_runs_a_file_with_a_progress_bar(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS)
    await ensure_topics(settings)
    with running_gateway(settings) as gw, running_worker(settings, **SYNTHETIC):
        source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        source.write_bytes(jsonl([completion_line(i) for i in range(30)]))
        args = ["batch", str(source), "--follow", "--url", gw.url, "--api-key", "key-one", "--output", str(out)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, cwd=ROOT, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, stderr.decode()
        assert "completed: 30 completed, 0 failed" in stderr.decode() and "30/30" in stderr.decode()
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(line["custom_id"] for line in lines) == sorted(f"line-{i}" for i in range(30))

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "batch", str(source), "--url", gw.url, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2 and b"401" in stderr and not stdout  # no key: one line, no traceback
        assert b"Traceback" not in stderr


async def test_a_gateway_that_joins_mid_batch_takes_batches_over_without_doubles(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A rebalance hands batches (with their events partitions) to the new gateway mid-submit; each line runs once."""
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS, batch_submit_chunk=8)
    await ensure_topics(settings)
    with running_gateway(settings) as first, running_worker(settings, **SLOW_SYNTHETIC):
        client = client_of(first.url)
        batches, lines = [], [chat_line(i, max_tokens=4) for i in range(150)]
        file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        for _ in range(4):  # over 2 partitions: the newcomer takes some of them with its partition
            batch = await client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            batches.append(batch)
        with running_gateway(gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS)) as second:
            other_client = client_of(second.url)
            # Any gateway answers at once for what another just wrote (it reads the batches topic up to its end first).
            extra = await client.files.create(file=("more.jsonl", jsonl(lines[:1])), purpose="batch")
            assert (await other_client.files.retrieve(extra.id)).id == extra.id
            extra_batch = await other_client.batches.create(
                input_file_id=extra.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            assert (await client.batches.retrieve(extra_batch.id)).id == extra_batch.id
            for batch in batches:
                done = await wait_batch(other_client, batch.id)
                assert done.status == "completed", done
                out = await read_file_lines(other_client, done.output_file_id)
                assert custom_id_counts(out) == {line["custom_id"]: 1 for line in lines}
                created_ms = int(batch_uuid(batch.id).replace("-", "")[:12], 16)
                ids = {line_request_id(batch.id, i + 1, created_ms).encode() for i in range(len(lines))}
                submitted = await keys_on_topic(settings, lines_topic(settings, "default"), ids)
                assert sorted(submitted.values()) == [1] * len(lines)
            await other_client.close()
        await client.close()


async def test_refusals_have_their_status_and_code(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = gateway_settings(
        kafka_bootstrap, topic_prefix, api_keys=KEYS, batch_max_file_bytes=4096, batch_max_lines=3
    )
    await ensure_topics(settings)
    with running_gateway(settings) as gw, running_worker(settings, **SYNTHETIC):
        client = client_of(gw.url)
        with pytest.raises(openai.APIStatusError) as too_large:
            await client.files.create(file=("big.jsonl", jsonl([chat_line(i) for i in range(40)])), purpose="batch")
        assert too_large.value.status_code == 413
        with pytest.raises(openai.BadRequestError, match="line 4: a batch file holds at most 3 requests"):
            await client.files.create(file=("many.jsonl", jsonl([chat_line(i) for i in range(4)])), purpose="batch")
        with pytest.raises(openai.UnprocessableEntityError, match="purpose"):
            await client.files.create(file=("a.jsonl", jsonl([chat_line(0)])), purpose="assistants")
        with pytest.raises(openai.BadRequestError, match="no lines"):
            await client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
        file = await client.files.create(file=("ok.jsonl", jsonl([chat_line(0)])), purpose="batch")
        for endpoint, window, code in (
            ("/v1/embeddings", "24h", 422),
            ("/v1/chat/completions", "48h", 422),
        ):
            with pytest.raises(openai.APIStatusError) as refused:
                await client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window=window)  # type: ignore[arg-type]
            assert refused.value.status_code == code
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(
                input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_nope")
        batch = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert (await wait_batch(client, batch.id)).status == "completed"
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(batch.id)
        await client.close()
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer key-one"}) as session:
            async with session.post(gw.url + "/v1/files", json={"purpose": "batch"}) as response:
                assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"
            async with session.get(gw.url + "/v1/batches?limit=0") as response:
                assert response.status == 422
        async with aiohttp.ClientSession() as session, session.get(gw.url + "/v1/files") as response:
            assert response.status == 401


@pytest.mark.slow
async def test_1000_lines_with_a_gateway_and_a_worker_sigkilled_answer_as_without(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The built-in model, greedy: a batch whose driving gateway dies mid-submit and one of whose two workers dies
    mid-run gives every line the body an undisturbed batch of the same lines gives."""
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=KEYS, batch_submit_chunk=32)
    await ensure_topics(settings)
    lines = [completion_line(i, max_tokens=32) for i in range(1000)]
    first = GatewayProcess(settings)
    first.start()
    try:
        with (
            running_worker(settings, TOKENRELAY_ENGINE="model") as doomed,
            running_worker(settings, TOKENRELAY_ENGINE="model"),
        ):
            client = client_of(first.url)
            reference = await run_batch(client, lines, "/v1/completions")
            assert reference.status == "completed", reference
            expected = {o["custom_id"]: o["response"] for o in await read_file_lines(client, reference.output_file_id)}

            file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=file.id, endpoint="/v1/completions", completion_window="24h"
            )
            await wait_batch(client, batch.id, until=("in_progress", *TERMINAL), timeout_s=60)
            first.kill()
            await client.close()
            assert (await stored_batch(settings, batch.id)).submitted < len(lines)
            with running_gateway(settings) as second:
                client = client_of(second.url)
                mid = await wait_batch(client, batch.id, completed_at_least=100)
                assert mid.status == "in_progress"  # the worker dies mid-batch
                doomed.send_signal(signal.SIGKILL)
                done = await wait_batch(client, batch.id)
                assert done.status == "completed", done
                out = await read_file_lines(client, done.output_file_id)
                assert custom_id_counts(out) == {line["custom_id"]: 1 for line in lines}
                differ = [
                    o["custom_id"]
                    for o in out
                    if without_volatile(o["response"]["body"]) != without_volatile(expected[o["custom_id"]]["body"])
                ]
                assert differ == [], f"{len(differ)} lines differ, e.g. {differ[:5]}"
                await client.close()
    finally:
        first.stop()

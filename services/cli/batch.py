"""`tokenrelay batch FILE.jsonl`: upload a Batch API file, create its batch, and follow it with a progress bar."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

import aiohttp
from tqdm import tqdm

from schemas.errors import TokenRelayError

TERMINAL = ("completed", "failed", "cancelled", "expired")
POLL_S = 0.5


class BatchClient:
    """The few Batch API calls the command needs, over HTTP."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_key: str | None):
        self.session = session
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def _answer(self, response: aiohttp.ClientResponse) -> Any:
        if response.status >= 400:
            text = await response.text()
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:500]
            raise TokenRelayError(f"{response.method} {response.url.path}: {response.status} {message}")
        if response.content_type == "application/json":
            return await response.json()
        return await response.read()

    async def upload(self, name: str, data: bytes) -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename=name, content_type="application/jsonl")
        async with self.session.post(f"{self.url}/v1/files", data=form, headers=self.headers) as response:
            answer: dict[str, Any] = await self._answer(response)
            return answer

    async def create(self, file_id: str, endpoint: str) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        async with self.session.post(f"{self.url}/v1/batches", json=body, headers=self.headers) as response:
            answer: dict[str, Any] = await self._answer(response)
            return answer

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/v1/batches/{batch_id}", headers=self.headers) as response:
            answer: dict[str, Any] = await self._answer(response)
            return answer

    async def content(self, file_id: str) -> bytes:
        async with self.session.get(f"{self.url}/v1/files/{file_id}/content", headers=self.headers) as response:
            data: bytes = await self._answer(response)
            return data


def endpoint_of(name: str, data: bytes) -> str:
    """The endpoint of a batch file: its first line's ``url``."""
    first = next((raw for raw in data.split(b"\n") if raw.strip()), b"")
    try:
        url = json.loads(first).get("url")
    except (ValueError, AttributeError):
        url = None
    if not isinstance(url, str):
        raise TokenRelayError(f"{name}: the first line is not a Batch API request with a url")
    return url


async def run_batch(
    name: str, data: bytes, url: str, api_key: str | None, *, follow: bool, output: TextIO | None = None
) -> int:
    """Upload the file and create its batch; with ``follow``, show its progress and write its output file."""
    try:
        return await _run(name, data, url, api_key, follow=follow, output=output or sys.stdout)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TokenRelayError(f"cannot reach the gateway at {url}: {exc or type(exc).__name__}") from None


async def _run(name: str, data: bytes, url: str, api_key: str | None, *, follow: bool, output: TextIO) -> int:
    endpoint = endpoint_of(name, data)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        client = BatchClient(session, url, api_key)
        uploaded = await client.upload(name, data)
        batch = await client.create(uploaded["id"], endpoint)
        if not follow:
            print(batch["id"], file=output, flush=True)
            return 0
        print(f"batch {batch['id']} ({uploaded['id']}, {endpoint})", file=sys.stderr, flush=True)
        batch = await _follow(client, batch, sys.stderr)
        counts = batch["request_counts"]
        print(
            f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, {counts['failed']} failed"
            + (f"; errors in {batch['error_file_id']}" if batch.get("error_file_id") else ""),
            file=sys.stderr,
        )
        if batch.get("output_file_id"):
            output.write((await client.content(batch["output_file_id"])).decode())
        return 0 if batch["status"] == "completed" else 1


async def _follow(client: BatchClient, batch: dict[str, Any], err: TextIO) -> dict[str, Any]:
    with tqdm(total=batch["request_counts"]["total"] or None, unit="line", file=err, desc=batch["status"]) as bar:
        while batch["status"] not in TERMINAL:
            await asyncio.sleep(POLL_S)
            batch = await client.retrieve(batch["id"])
            counts = batch["request_counts"]
            bar.total = counts["total"] or bar.total
            bar.set_description(batch["status"])
            bar.update(counts["completed"] + counts["failed"] - bar.n)
    return batch

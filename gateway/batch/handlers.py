"""HTTP handlers of ``/v1/files`` and ``/v1/batches``: thin, over the store and the endpoints' own checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import BodyPartReader, web

from gateway.api.context import gateway_of, read_json, require_key
from gateway.api.responses_body import parse_metadata
from gateway.batch.answers import line_record
from gateway.batch.lines import parse_lines
from gateway.batch.objects import (
    CANCELLED,
    CANCELLING,
    COMPLETION_WINDOWS,
    ENDPOINTS,
    TERMINAL,
    BatchState,
    FileMeta,
    new_batch_id,
    new_file_id,
    page,
)
from gateway.batch.service import BATCH, BatchService, service_of
from schemas.errors import BodyError, BodyTooLarge, Conflict, FieldError, NotFound, RequestTimeout

READ_CHUNK = 64 * 1024
MAX_SHOWN_ERRORS = 20
PURPOSES = ("batch",)
MAX_PURPOSE_BYTES = 64


# --- files ---------------------------------------------------------------------------------------------------------


async def create_file(request: web.Request) -> web.Response:
    gw, service = gateway_of(request), service_of(request)
    tenant = require_key(request)
    limit = gw.settings.batch_max_file_bytes
    if request.content_length is not None and request.content_length > limit + READ_CHUNK:
        raise BodyTooLarge(f"a file may have at most {limit} bytes")
    if not request.content_type.startswith("multipart/"):
        raise BodyError("send the file as multipart/form-data with the fields purpose and file")
    timeout_s = gw.settings.http_body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            purpose, filename, data = await _read_form(request, limit)
    except TimeoutError:
        raise RequestTimeout(f"the upload did not arrive within {timeout_s:g} s") from None
    if purpose not in PURPOSES:
        raise FieldError("purpose", f"must be one of {', '.join(PURPOSES)}")
    if data is None:
        raise FieldError("file", "is required")

    def check(url: str, body: dict[str, Any]) -> object:
        return line_record(gw, url, body, tenant)

    # Off the event loop: a file of many lines takes a while to check, and streams share this loop.
    lines, errors = await asyncio.to_thread(parse_lines, data, gw.settings.batch_max_lines, check)
    if errors:
        shown = "; ".join(str(e) for e in errors[:MAX_SHOWN_ERRORS])
        more = f" (and {len(errors) - MAX_SHOWN_ERRORS} more)" if len(errors) > MAX_SHOWN_ERRORS else ""
        raise BodyError(f"{len(errors)} invalid lines: {shown}{more}", code="invalid_file")
    if not lines:
        raise BodyError("the file has no lines", code="invalid_file")
    created = int(time.time())
    expires = created + gw.settings.files_retention_ms // 1000
    meta = FileMeta(new_file_id(created * 1000), tenant, filename, purpose, len(data), created, expires)
    meta.lines = len(lines)
    await service.store.save_file(meta, data)
    return web.json_response(meta.as_openai())


async def _read_form(request: web.Request, limit: int) -> tuple[str | None, str, bytes | None]:
    """The ``purpose`` and ``file`` fields of a multipart upload (the file's name and bytes)."""
    purpose, filename, data = None, "", None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BodyError("nested multipart bodies are not supported")
        if part.name == "purpose":
            purpose = (await _read_limited(part, MAX_PURPOSE_BYTES)).decode("utf-8", "replace").strip()
        elif part.name == "file":
            filename = part.filename or "upload.jsonl"
            data = await _read_limited(part, limit)
        else:
            await part.release()
    return purpose, filename, data


async def _read_limited(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"a file may have at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _own_file(request: web.Request) -> FileMeta:
    tenant = require_key(request)
    store = service_of(request).store
    await store.sync()
    file_id = request.match_info["id"]
    meta = store.files.get(file_id)
    if meta is None or meta.tenant != tenant:  # another key's file is as unknown as a missing one
        raise NotFound(f"no file {file_id[:80]!r}")
    return meta


async def list_files(request: web.Request) -> web.Response:
    tenant = require_key(request)
    store = service_of(request).store
    await store.sync()
    purpose = request.query.get("purpose")
    files = [f for f in store.files.values() if f.tenant == tenant and (purpose is None or f.purpose == purpose)]
    ascending = request.query.get("order", "desc") == "asc"
    files.sort(key=lambda f: (f.created_at, f.id), reverse=not ascending)
    items, more = page_after(request.query, [f.as_openai() for f in files], default_limit=10_000, max_limit=10_000)
    return web.json_response(page(items, len(items), more))


async def retrieve_file(request: web.Request) -> web.Response:
    return web.json_response((await _own_file(request)).as_openai())


async def file_content(request: web.Request) -> web.Response:
    meta = await _own_file(request)
    data = await service_of(request).store.read_content(meta)
    return web.Response(body=data, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    meta = await _own_file(request)
    await service_of(request).store.delete_file(meta.id)
    return web.json_response({"id": meta.id, "object": "file", "deleted": True})


# --- batches -------------------------------------------------------------------------------------------------------


async def create_batch(request: web.Request) -> web.Response:
    gw, service = gateway_of(request), service_of(request)
    tenant = require_key(request)
    body = await read_json(request)
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise FieldError("endpoint", f"must be one of {', '.join(ENDPOINTS)}")
    window = body.get("completion_window")
    if window not in COMPLETION_WINDOWS:
        raise FieldError("completion_window", f"must be one of {', '.join(COMPLETION_WINDOWS)}")
    metadata = parse_metadata(body.get("metadata")) or None
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise FieldError("input_file_id", "must be a string")
    await service.store.sync()
    meta = service.store.files.get(file_id)
    if meta is None or meta.tenant != tenant:
        raise NotFound(f"no file {file_id[:80]!r}")
    if meta.purpose != "batch":
        raise FieldError("input_file_id", "the file's purpose must be batch")
    now_ms = int(time.time() * 1000)
    created = now_ms // 1000
    state = BatchState(
        id=new_batch_id(now_ms),
        tenant=tenant,
        endpoint=endpoint,
        input_file_id=file_id,
        completion_window=window,
        created_at=created,
        created_ms=now_ms,
        expires_at=created + gw.settings.batch_window_s,
        metadata=metadata,
        total=meta.lines,
        input_partition=meta.partition,
        input_offsets=list(meta.offsets),
    )
    await service.store.put_batch(state)
    return web.json_response(state.as_openai())


async def _own_batch(request: web.Request) -> BatchState:
    tenant = require_key(request)
    store = service_of(request).store
    await store.sync()
    batch_id = request.match_info["id"]
    state = store.batches.get(batch_id)
    if state is None or state.tenant != tenant:
        raise NotFound(f"no batch {batch_id[:80]!r}")
    return state


async def retrieve_batch(request: web.Request) -> web.Response:
    state = await _own_batch(request)
    return web.json_response(state.as_openai(service_of(request).store.cancels.get(state.id)))


async def cancel_batch(request: web.Request) -> web.Response:
    state = await _own_batch(request)
    store = service_of(request).store
    if state.status in TERMINAL and state.status != CANCELLED:
        raise Conflict(f"a batch that is {state.status} cannot be cancelled", code="batch_not_cancellable")
    asked = store.cancels.get(state.id)
    if asked is None and state.status not in (CANCELLING, CANCELLED):
        asked = int(time.time())
        await store.put_cancel(state.id, asked)
    return web.json_response(state.as_openai(asked))


async def list_batches(request: web.Request) -> web.Response:
    tenant = require_key(request)
    store = service_of(request).store
    await store.sync()
    batches = sorted(
        (b for b in store.batches.values() if b.tenant == tenant), key=lambda b: (b.created_ms, b.id), reverse=True
    )
    items, more = page_after(request.query, [b.as_openai(store.cancels.get(b.id)) for b in batches], 20, 100)
    return web.json_response(page(items, len(items), more))


def page_after(
    query: Mapping[str, str], items: list[dict[str, Any]], default_limit: int, max_limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The page after the item ``after`` names (from the start without it), ``limit`` long; and whether more follow."""
    text = query.get("limit", str(default_limit))
    try:
        limit = int(text)
    except ValueError:
        raise FieldError("limit", "must be an integer") from None
    if not 1 <= limit <= max_limit:
        raise FieldError("limit", f"must be between 1 and {max_limit}")
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


def add_routes(app: web.Application, service: BatchService) -> None:
    app[BATCH] = service
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{id}", retrieve_file)
    app.router.add_get("/v1/files/{id}/content", file_content)
    app.router.add_delete("/v1/files/{id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{id}", retrieve_batch)
    app.router.add_post("/v1/batches/{id}/cancel", cancel_batch)

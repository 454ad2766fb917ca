"""The Batch API's objects, pure: ids, the file and batch records kept in Kafka, and their OpenAI shapes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from schemas.ids import new_request_id

BATCH_PREFIX = "batch_"
FILE_PREFIX = "file-"
LINE_PREFIX = "batch_req_"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
COMPLETION_WINDOWS = ("24h",)

# The status lifecycle: validating -> in_progress -> finalizing -> completed, or failed (validation), or
# cancelling -> cancelled, or expired (the window ended first).
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
EXPIRED = "expired"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})

EXPIRED_ERROR = ("batch_expired", "This request could not be executed before the completion window expired.")
CANCELLED_ERROR = ("batch_cancelled", "This request was not executed because the batch was cancelled.")


# --- ids ----------------------------------------------------------------------------------------------------------


def new_batch_id(now_ms: int) -> str:
    """``batch_`` and the hex of a UUIDv7: time-ordered, and mapped to an events partition (its driver's)."""
    return BATCH_PREFIX + uuid.UUID(new_request_id(now_ms)).hex


def new_file_id(now_ms: int) -> str:
    return FILE_PREFIX + uuid.UUID(new_request_id(now_ms)).hex


def batch_uuid(batch_id: str) -> str:
    """The UUID behind a batch id (the key that places it in an events partition); ValueError if it is none."""
    hex_part = batch_id.removeprefix(BATCH_PREFIX)
    if hex_part == batch_id or len(hex_part) != 32 or hex_part != hex_part.lower():
        raise ValueError(batch_id)
    return str(uuid.UUID(hex=hex_part))


def output_file_id(batch_id: str) -> str:
    return f"{FILE_PREFIX}{batch_id.removeprefix(BATCH_PREFIX)}-output"


def error_file_id(batch_id: str) -> str:
    return f"{FILE_PREFIX}{batch_id.removeprefix(BATCH_PREFIX)}-errors"


def line_request_id(batch_id: str, line: int, created_ms: int) -> str:
    """The request id of one line: a UUIDv7 with the batch's time and random bits hashed from (batch, line).

    Every gateway that submits the line makes the same id, which is what lets a gateway that takes a batch over
    find which lines are already on their topic.
    """
    digest = int.from_bytes(hashlib.sha256(f"{batch_id}\0{line}".encode()).digest()[:10], "big")
    rand_a = digest >> 68 & 0xFFF
    rand_b = digest & ((1 << 62) - 1)
    value = created_ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def line_output_id(request_id: str) -> str:
    return LINE_PREFIX + uuid.UUID(request_id).hex


# --- records kept in the compacted batches topic --------------------------------------------------------------------


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(slots=True)
class FileMeta:
    """A stored file: what ``/v1/files`` shows, its owner, and where its chunks are in the files topic."""

    id: str
    tenant: str
    filename: str
    purpose: str
    size: int
    created_at: int
    expires_at: int | None = None
    lines: int = 0
    partition: int = 0
    offsets: list[int] = field(default_factory=list)

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> FileMeta:
        meta: FileMeta = _from_dict(cls, json.loads(raw))
        return meta


@dataclass(slots=True)
class BatchState:
    """A batch: the OpenAI object's fields, its owner and model, and the submit cursor of its driver.

    Written by the gateway that creates it, then only by its driver (the gateway that owns the batch's events
    partition), so there is one writer at a time. A cancel is a record of its own (``cancel:<id>``).
    """

    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    created_ms: int
    expires_at: int
    status: str = VALIDATING
    metadata: dict[str, str] | None = None
    model: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    submitted: int = 0  # lines [0, submitted) are on their topic
    submitted_ms: int = 0  # when the cursor was last written: lines after it were produced later
    # Where the input file's chunks are: the batch runs on even if the file is deleted meanwhile.
    input_partition: int = 0
    input_offsets: list[int] = field(default_factory=list)

    def input_file(self) -> FileMeta:
        """The input file as the batch recorded it when created."""
        return FileMeta(
            id=self.input_file_id,
            tenant=self.tenant,
            filename="",
            purpose="batch",
            size=0,
            created_at=self.created_at,
            lines=self.total,
            partition=self.input_partition,
            offsets=list(self.input_offsets),
        )

    def as_openai(self, cancelling_at: int | None = None) -> dict[str, Any]:
        """The OpenAI Batch object; ``cancelling_at`` is a cancel the driver has not taken up yet."""
        status, cancelling = self.status, self.cancelling_at
        if cancelling_at is not None and status not in TERMINAL and status != CANCELLING:
            status, cancelling = CANCELLING, cancelling_at
        usage = self.usage or {"input_tokens": 0, "output_tokens": 0}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": cancelling,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {
                "input_tokens": usage["input_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["input_tokens"] + usage["output_tokens"],
            },
            "metadata": self.metadata,
        }

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BatchState:
        state: BatchState = _from_dict(cls, json.loads(raw))
        return state


# --- output lines ---------------------------------------------------------------------------------------------------


def output_line(request_id: str, custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """A line of the output (2xx) or error (other status) file: the endpoint's answer to the line's request."""
    return {
        "id": line_output_id(request_id),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(request_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line of the error file for a request that did not run (the batch expired or was cancelled first)."""
    return {
        "id": line_output_id(request_id),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)


def page(items: list[dict[str, Any]], limit: int, more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: ``after`` the last id of one page asks for the next."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": more,
    }

"""Typed records of the topics, mirroring the `.avsc` files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

FINISH_REASONS = ("stop", "length", "cancelled")
# Service classes: interactive work never waits behind batch work (each class has its own topic per model).
PRIORITIES = ("interactive", "batch")


@dataclass(slots=True, frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: str | None = None  # an assistant turn's calls, OpenAI's JSON array
    tool_call_id: str | None = None  # a tool turn answers this call
    name: str | None = None


@dataclass(slots=True, frozen=True)
class InferenceRequest:
    request_id: str
    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    messages: tuple[ChatMessage, ...] | None = None
    model: str = ""
    deadline_ms: int | None = None
    tenant: str = ""
    created_ms: int | None = None
    priority: str = "interactive"
    batch_id: str = ""
    custom_id: str = ""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: Mapping[str, float] = field(default_factory=dict)  # token id (decimal) -> bias
    n: int = 1  # choices of the one prompt, prefilled once; each Delta names its choice
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: str | None = None  # JSON: {"type": "json_object"} or {"type": "json_schema", ...}
    tools: str | None = None  # JSON array of function tools
    tool_choice: str | None = None  # JSON


@dataclass(slots=True, frozen=True)
class Started:
    worker: str
    model: str
    prompt_tokens: int
    queue_ms: int
    tenant: str = ""
    continues_run_id: str | None = None
    continued_tokens: int = 0
    continued_text: str = ""


@dataclass(slots=True, frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    token_bytes: bytes = b""  # the token's bytes as the tokenizer spells it alone (OpenAI's `bytes`)


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A generated token's log probability in the distribution it was drawn from, with the likeliest alternatives."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    token_bytes: bytes = b""


@dataclass(slots=True, frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    index: int = 0  # the choice (n > 1)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id when the request asked for logprobs


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True, frozen=True)
class Finished:
    finish_reason: str
    usage: Usage
    ttft_ms: int = 0
    total_ms: int = 0
    choice_finish_reasons: tuple[str, ...] = ()  # n > 1: each choice's, by index
    tool_calls: str | None = None  # choice 0's parsed tool calls, OpenAI's JSON array


@dataclass(slots=True, frozen=True)
class Failed:
    code: str
    message: str
    retriable: bool = False


@dataclass(slots=True, frozen=True)
class Accepted:
    """Written by the gateway at submit time (empty run id), so that every gateway knows the request at once."""

    model: str
    tenant: str = ""
    deadline_ms: int | None = None
    background: bool = False  # keeps running when its creating client disconnects; cancellable by id
    store: bool = True  # readable by id after it ends
    metadata: Mapping[str, str] = field(default_factory=dict)
    priority: str = "interactive"  # the service class (PRIORITIES): the request topic it was written to
    response: str | None = None  # Responses API: the create options a response object echoes (JSON object)
    input_items: str | None = None  # Responses API: the whole input as Responses items (JSON array)


@dataclass(slots=True, frozen=True)
class Deleted:
    """A stored response was deleted: every gateway answers 404 for it from then on."""

    tenant: str = ""


# The closed vocabulary of the events log: every consumer matches on it exhaustively (`assert_never`), so mypy lists
# each place a new payload type must be handled (tests/unit/test_vocabulary.py runs them all over every type).
Payload = Started | Delta | Finished | Failed | Accepted | Deleted


@dataclass(slots=True, frozen=True)
class TokenEvent:
    request_id: str
    run_id: str
    seq: int
    ts_ms: int
    payload: Payload

    @property
    def is_terminal(self) -> bool:
        payload = self.payload
        match payload:
            case Finished() | Failed():
                return True
            case Started() | Delta() | Accepted() | Deleted():
                return False
            case _:
                assert_never(payload)


@dataclass(slots=True, frozen=True)
class ControlEvent:
    request_id: str
    action: str
    ts_ms: int
    reason: str = ""


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """A worker's announcement of a model it serves; holds until ``ts_ms + ttl_ms`` (0: stopped)."""

    name: str
    worker: str
    context_length: int
    ts_ms: int
    has_chat_template: bool = False
    max_batch_size: int = 0
    max_tokens_limit: int = 0
    engine: str = "model"
    device: str = ""
    source: str = ""
    ttl_ms: int = 15_000

    def live(self, now_ms: int) -> bool:
        return self.ttl_ms > 0 and now_ms < self.ts_ms + self.ttl_ms


Record = InferenceRequest | TokenEvent | ControlEvent | ModelInfo

_PAYLOAD_TYPES: dict[str, type[Payload]] = {
    "io.tokenrelay.Started": Started,
    "io.tokenrelay.Delta": Delta,
    "io.tokenrelay.Finished": Finished,
    "io.tokenrelay.Failed": Failed,
    "io.tokenrelay.Accepted": Accepted,
    "io.tokenrelay.Deleted": Deleted,
}
_PAYLOAD_NAMES = {cls: name for name, cls in _PAYLOAD_TYPES.items()}
PAYLOAD_TYPES: tuple[type[Payload], ...] = tuple(_PAYLOAD_TYPES.values())  # each member of Payload, by Avro name


def to_avro(record: Record) -> dict[str, Any]:
    """The dict fastavro writes for a record."""
    if isinstance(record, TokenEvent):
        payload = record.payload
        body: dict[str, Any]
        match payload:
            case Finished():
                body = {
                    "finish_reason": payload.finish_reason,
                    "usage": {
                        "prompt_tokens": payload.usage.prompt_tokens,
                        "completion_tokens": payload.usage.completion_tokens,
                    },
                    "ttft_ms": payload.ttft_ms,
                    "total_ms": payload.total_ms,
                    "choice_finish_reasons": list(payload.choice_finish_reasons),
                    "tool_calls": payload.tool_calls,
                }
            case Delta():
                body = {
                    "text": payload.text,
                    "token_ids": list(payload.token_ids),
                    "index": payload.index,
                    "logprobs": [
                        {
                            "token_id": lp.token_id,
                            "logprob": lp.logprob,
                            "token_bytes": lp.token_bytes,
                            "top": [_fields(t) for t in lp.top],
                        }
                        for lp in payload.logprobs
                    ],
                }
            case Started() | Failed() | Accepted() | Deleted():
                body = _fields(payload)
            case _:
                assert_never(payload)
        return {
            "request_id": record.request_id,
            "run_id": record.run_id,
            "seq": record.seq,
            "ts_ms": record.ts_ms,
            "payload": (_PAYLOAD_NAMES[type(payload)], body),
        }
    if isinstance(record, InferenceRequest):
        out = _fields(record)
        out["stop"] = list(record.stop)
        out["logit_bias"] = dict(record.logit_bias)
        if record.messages is not None:
            out["messages"] = [_fields(m) for m in record.messages]
        return out
    return _fields(record)


def from_avro(kind: str, data: dict[str, Any]) -> Record:
    """Typed record from the dict fastavro read (unions decoded with record names)."""
    if kind == "TokenEvent":
        name, body = data["payload"]
        cls = _PAYLOAD_TYPES[name]
        payload: Payload
        if cls is Finished:
            payload = Finished(
                finish_reason=body["finish_reason"],
                usage=Usage(**body["usage"]),
                ttft_ms=body["ttft_ms"],
                total_ms=body["total_ms"],
                choice_finish_reasons=tuple(body["choice_finish_reasons"]),
                tool_calls=body["tool_calls"],
            )
        elif cls is Delta:
            payload = Delta(
                text=body["text"],
                token_ids=tuple(body["token_ids"]),
                index=body["index"],
                logprobs=tuple(
                    TokenLogprob(
                        lp["token_id"], lp["logprob"], tuple(TopLogprob(**t) for t in lp["top"]), lp["token_bytes"]
                    )
                    for lp in body["logprobs"]
                ),
            )
        else:
            payload = cls(**body)
        return TokenEvent(data["request_id"], data["run_id"], data["seq"], data["ts_ms"], payload)
    if kind == "InferenceRequest":
        values = dict(data)
        values["stop"] = tuple(values["stop"])
        if values["messages"] is not None:
            values["messages"] = tuple(ChatMessage(**m) for m in values["messages"])
        return InferenceRequest(**values)
    if kind == "ControlEvent":
        return ControlEvent(**data)
    if kind == "ModelInfo":
        return ModelInfo(**data)
    raise KeyError(kind)


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def kind_of(record: Record) -> str:
    """Avro record name (without namespace) of a record."""
    return type(record).__name__


__all__ = [
    "FINISH_REASONS",
    "PAYLOAD_TYPES",
    "Accepted",
    "ChatMessage",
    "ControlEvent",
    "Deleted",
    "Delta",
    "Failed",
    "Finished",
    "InferenceRequest",
    "ModelInfo",
    "Payload",
    "Record",
    "Started",
    "TokenEvent",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "from_avro",
    "kind_of",
    "to_avro",
]

"""The project's error hierarchy, with the HTTP answer of each error the gateway can return.

TokenRelayError                 root; every error raised on purpose by tokenrelay   500 internal_error
├── ConfigError                 a setting or command-line value is unusable
├── DecodeError                 bytes that are not a valid framed Avro record
│   └── SchemaUnavailable       the schema registry could not be asked for a writer schema (retriable)
├── ValidationError             a decoded record or HTTP body breaks a rule         422 invalid
│   ├── FieldError              one named field breaks a rule                       422 invalid_field (+ field)
│   │   ├── Unsupported         a parameter asks for what tokenrelay does not do    400 unsupported_parameter
│   │   └── InvalidParameter    a parameter OpenAI's API refuses with a 400         400 (a code per parameter)
│   ├── BodyError               an HTTP body that is not a JSON object              400 invalid_json
│   └── RequestRefused          the model cannot take this request (its limits)     400 (a code per reason)
├── BodyTooLarge                an HTTP body over the size limit                    413 body_too_large
│   └── RecordTooLarge          a request whose Kafka record is over the cluster's  413 record_too_large
│                               record size limit (permanent: not retriable)
├── CursorError                 an SSE cursor that cannot be parsed                 400 bad_cursor
├── Unauthorized                no valid API key (or stream token)                  401 unauthorized
├── Forbidden                   a valid stream token that does not allow this       403 forbidden
├── NotFound                    no such request, or not the caller's to see         404 not_found
│   └── ModelNotFound           no live worker serves the model asked for           404 model_not_found
├── Conflict                    the request's state does not allow this             409 conflict
├── MalformedRequest            HTTP the parser refuses (framing, bytes, sizes)     400 malformed_request
├── RequestTimeout              a request head or body did not arrive in time       408 request_timeout
├── QueueFull                   too many requests wait for a worker                 429 queue_full, Retry-After
├── RateLimited                 an API key is over a quota (rpm, tpm, concurrent)   429 rate_limit_exceeded, Retry-After
├── TooManyBackfills            one client has too many Kafka scans waiting         429 too_many_backfills, Retry-After
├── GenerationFailed            the request ended in an error (whole answers)       502 (the error's code)
├── ClientClosed                the client went away before its answer              499 client_closed
├── BrokerError                 the local broker cannot be set up or started
│   └── MissingToolError        java or mvn is not installed
├── KafkaUnavailable            the cluster cannot be reached (retriable)           503 kafka_unavailable, Retry-After
├── RegistryError               the schema registry refuses a schema or the embedded one cannot start
├── TooManyConnections          at the connection cap (retriable, Retry-After)      503 too_many_connections
├── NotOwner                    a forwarded stream asked of a gateway that does not   421 not_owner
│                               read its partition (retriable: the caller re-resolves)
└── EngineError                 the model or scheduler failed
    └── EngineRefused           the engine cannot do what the request asks          (a code per reason)

Lower-level errors (aiokafka, torch, OS) are translated where they enter the
project (aiokafka's at ``services.kafka.map_kafka_errors``); ``retriable`` tells
callers whether trying again can help. The gateway's error middleware is the one
place that turns these into HTTP answers: ``http_status``, ``retry_after_s`` and
``headers`` say how; a handler only raises. (Its HTTP listener renders the same way
what never reaches the application: malformed HTTP, a refusal at the connection cap,
a request head that does not arrive.)
"""

from __future__ import annotations


class TokenRelayError(Exception):
    """Root of every error tokenrelay raises on purpose."""

    code: str = "internal_error"
    retriable: bool = False
    http_status: int = 500
    retry_after_s: int | None = None
    # What an HTTP client is told instead of the message (which may name internals); None: the message itself.
    public_message: str | None = None

    def __init__(self, message: str, *, code: str | None = None, retriable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retriable is not None:
            self.retriable = retriable

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides its JSON body."""
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class ConfigError(TokenRelayError):
    code = "config_error"


class DecodeError(TokenRelayError):
    code = "undecodable"


class UnknownSchemaId(DecodeError):
    """The registry does not know the record's schema id. Said once per id by the registry client, so readers
    leave it out of their per-record warnings."""


class SchemaUnavailable(DecodeError):
    """The bytes may be fine: the registry that knows their schema id did not answer."""

    code = "schema_registry_unavailable"
    retriable = True


class ValidationError(TokenRelayError):
    code = "invalid"
    http_status = 422


class FieldError(ValidationError):
    """One named field of a body or record breaks a rule."""

    code = "invalid_field"

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


class BodyError(ValidationError):
    """An HTTP body that is not a JSON object, or not one this endpoint takes as a whole."""

    code = "invalid_json"
    http_status = 400


class Unsupported(FieldError):
    """A parameter asks for a feature tokenrelay does not implement (tools, images, ...): refused, never ignored."""

    code = "unsupported_parameter"
    http_status = 400


class InvalidParameter(FieldError):
    """A malformed value that OpenAI's API answers with 400 (response_format, tools, tool_choice), not 422."""

    code = "invalid_parameter"
    http_status = 400

    def __init__(self, field_name: str, message: str, *, code: str | None = None):
        super().__init__(field_name, message)
        if code is not None:
            self.code = code


class RequestRefused(ValidationError):
    """The model cannot take the request (context, chat template): 400, with the reason as the code."""

    code = "invalid_request"
    http_status = 400


class BodyTooLarge(TokenRelayError):
    code = "body_too_large"
    http_status = 413


class RecordTooLarge(BodyTooLarge):
    code = "record_too_large"


class CursorError(TokenRelayError):
    code = "bad_cursor"
    http_status = 400


class Unauthorized(TokenRelayError):
    code = "unauthorized"
    http_status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(TokenRelayError):
    code = "forbidden"
    http_status = 403


class MalformedRequest(TokenRelayError):
    code = "malformed_request"
    http_status = 400
    public_message = "the HTTP request is malformed"


class RequestTimeout(TokenRelayError):
    code = "request_timeout"
    http_status = 408


class NotFound(TokenRelayError):
    code = "not_found"
    http_status = 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(TokenRelayError):
    code = "conflict"
    http_status = 409


class QueueFull(TokenRelayError):
    code = "queue_full"
    http_status = 429
    retriable = True
    retry_after_s = 2


class RateLimited(TokenRelayError):
    """An API key is over one of its quotas; says which (``dimension``) and when to try again."""

    code = "rate_limit_exceeded"
    http_status = 429
    retriable = True

    def __init__(self, message: str, *, dimension: str, retry_after_ms: int):
        super().__init__(message)
        self.dimension = dimension
        self.retry_after_ms = retry_after_ms
        self.retry_after_s = max(1, -(-retry_after_ms // 1000))

    def headers(self) -> dict[str, str]:
        # retry-after-ms: what OpenAI's SDKs read first, finer than Retry-After's whole seconds.
        return {**super().headers(), "retry-after-ms": str(self.retry_after_ms)}


class GenerationFailed(TokenRelayError):
    """A request's terminal error, answered as a whole (non-streaming) response; ``code`` is the worker's."""

    code = "failed"
    http_status = 502


class ClientClosed(TokenRelayError):
    code = "client_closed"
    http_status = 499


class BrokerError(TokenRelayError):
    code = "broker_error"


class MissingToolError(BrokerError):
    code = "missing_tool"


class TooManyBackfills(TokenRelayError):
    code = "too_many_backfills"
    http_status = 429
    retriable = True
    retry_after_s = 1
    public_message = "too many look-ups of older requests are waiting; try again"


class KafkaUnavailable(TokenRelayError):
    code = "kafka_unavailable"
    retriable = True
    http_status = 503
    retry_after_s = 1
    public_message = "the broker is not reachable; try again"


class RegistryError(TokenRelayError):
    code = "schema_registry_error"


class TooManyConnections(TokenRelayError):
    code = "too_many_connections"
    http_status = 503
    retriable = True
    retry_after_s = 1
    public_message = "the gateway is at its connection limit"


class NotOwner(TokenRelayError):
    code = "not_owner"
    retriable = True
    http_status = 421


class EngineError(TokenRelayError):
    code = "engine_error"


class EngineRefused(EngineError):
    """The served model's engine cannot do what this request asks (the request ends with this code, never ignored)."""

    code = "unsupported_parameter"


# Codes of a worker's Failed that say the request itself was wrong (answered 4xx where an HTTP answer is still open).
REFUSAL_CODES = frozenset(
    {
        "prompt_too_long",
        "context_length_exceeded",
        "chat_template_missing",
        "deadline_exceeded",
        "unsupported_parameter",
    }
)


def ended_with(code: str, message: str) -> TokenRelayError:
    """The HTTP error of a request that ended in ``Failed(code)``: the request's fault (400) or the service's (502)."""
    if code in REFUSAL_CODES or code.endswith("_invalid"):
        return RequestRefused(message, code=code)
    return GenerationFailed(message, code=code)

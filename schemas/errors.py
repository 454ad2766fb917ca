"""The project's error hierarchy.

TokenRelayError                 root; every error raised on purpose by tokenrelay
├── ConfigError                 a setting or command-line value is unusable
├── DecodeError                 bytes that are not a valid framed Avro record
├── ValidationError             a decoded record or HTTP body breaks a rule
│   └── FieldError              one named field breaks a rule
├── CursorError                 an SSE cursor that cannot be parsed
├── BrokerError                 the local broker cannot be set up or started
│   └── MissingToolError        java or mvn is not installed
├── KafkaUnavailable            the cluster cannot be reached (retriable)
└── EngineError                 the model or scheduler failed

Lower-level errors (aiokafka, torch, OS) are translated where they enter the
project; ``retriable`` tells callers whether trying again can help.
"""

from __future__ import annotations


class TokenRelayError(Exception):
    """Root of every error tokenrelay raises on purpose."""

    code: str = "internal_error"
    retriable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retriable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retriable is not None:
            self.retriable = retriable


class ConfigError(TokenRelayError):
    code = "config_error"


class DecodeError(TokenRelayError):
    code = "undecodable"


class ValidationError(TokenRelayError):
    code = "invalid"


class FieldError(ValidationError):
    """One named field of a body or record breaks a rule."""

    code = "invalid_field"

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class CursorError(TokenRelayError):
    code = "bad_cursor"


class BrokerError(TokenRelayError):
    code = "broker_error"


class MissingToolError(BrokerError):
    code = "missing_tool"


class KafkaUnavailable(TokenRelayError):
    code = "kafka_unavailable"
    retriable = True


class EngineError(TokenRelayError):
    code = "engine_error"

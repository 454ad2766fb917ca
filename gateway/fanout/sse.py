"""Server-Sent Events framing."""

from __future__ import annotations

RETRY_MS = 1000
PREAMBLE = f"retry: {RETRY_MS}\n\n".encode()
KEEPALIVE = b": keepalive\n\n"


def frame(event: str | None, data: str, event_id: str | None = None) -> bytes:
    """One SSE event; every line of data gets its own `data:` field so newlines survive."""
    parts: list[str] = []
    if event_id is not None:
        _check_field(event_id)
        parts.append(f"id: {event_id}\n")
    if event is not None:
        _check_field(event)
        parts.append(f"event: {event}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def _check_field(value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"SSE field may not contain line breaks: {value!r}")


def parse(stream: str) -> list[dict[str, str]]:
    """Events of an SSE text (the browser's algorithm, simplified): for tests and tools."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    data: list[str] = []
    for line in stream.replace("\r\n", "\n").split("\n"):
        if line == "":
            if data or current:
                if data:
                    current["data"] = "\n".join(data)
                events.append(current)
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event", "retry"):
            current[name] = value
    return events

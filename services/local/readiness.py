"""Can the stack serve? One 1-token request through the gateway, followed to its terminal event."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Longer than the gateway's keepalive interval, so an idle stream is never mistaken for a dead one.
READ_TIMEOUT_S = 60.0
PROBE_PROMPT = "Hello"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """How the probe request ended: ``ok`` when a worker answered it with ``done``."""

    ok: bool
    request_id: str
    detail: str  # finish reason, or the error's code and message
    first_event_s: float  # from submit to the first event a worker wrote (started, or an error)
    total_s: float


MODEL_POLL_S = 0.5


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def sse_events(lines: Iterator[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each complete event in an SSE byte stream; comments and ids are skipped."""
    name, data = "message", ""
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data += line.split(":", 1)[1].strip()
        elif line == "":
            if data:
                yield name, json.loads(data)
            name, data = "message", ""


def _submit_when_served(gateway_url: str, api_key: str | None, deadline: float) -> dict[str, Any]:
    """Submit the probe request once a worker has announced the default model (404 model_not_found until then)."""
    body = json.dumps({"prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0}).encode()
    while True:
        request = urllib.request.Request(
            f"{gateway_url}/v1/requests", data=body, headers=_headers(api_key), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise
        time.sleep(MODEL_POLL_S)


def probe(gateway_url: str, api_key: str | None = None, deadline_s: float = 600.0) -> ProbeResult:
    """Submit one greedy 1-token request and wait for its ``done`` or ``error``; raises OSError if the gateway
    cannot be reached, TimeoutError past ``deadline_s``.

    This proves what /readyz cannot yet: that a worker consumes the requests topic and answers. Once the gateway's
    readiness includes a live worker per model (the `models` topic), polling /readyz can replace it.
    """
    began = time.monotonic()
    submitted = _submit_when_served(gateway_url, api_key, began + deadline_s)
    request_id, events_url = submitted["id"], gateway_url + submitted["events_url"]
    first: float | None = None
    while time.monotonic() - began < deadline_s:
        try:
            stream = urllib.request.Request(events_url, headers=_headers(api_key))
            with urllib.request.urlopen(stream, timeout=READ_TIMEOUT_S) as response:
                for name, data in sse_events(iter(response.readline, b"")):
                    if first is None:
                        first = time.monotonic() - began
                    if name == "done":
                        return ProbeResult(True, request_id, data["finish_reason"], first, time.monotonic() - began)
                    if name == "error":
                        detail = f"{data.get('code')}: {data.get('message')}"
                        return ProbeResult(False, request_id, detail, first, time.monotonic() - began)
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            # A quiet stream or a dropped connection: read it again from its start until the deadline.
            continue
    raise TimeoutError(f"no answer to the probe request {request_id} in {deadline_s:.0f} s")


def kafka_answers(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a broker of ``bootstrap`` (comma-separated host:port) answers a metadata request."""
    from services.local.broker.runner import metadata_ready

    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        if host and port.isdigit() and metadata_ready(host.strip("[]"), int(port), timeout_s=timeout_s):
            return True
    return False

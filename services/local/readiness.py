"""Can the stack serve? One 1-token request through the gateway, followed to its terminal event."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from schemas.view import EventName
from services.settings import Settings

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


def gateway_serving(gateway_url: str, timeout_s: float = 1.0, *, model_served: bool = False) -> bool:
    """Whether the gateway itself is up (its /readyz is 200, or 503 only because no worker serves a model yet):
    for starting a gateway before any worker, as tests and benchmarks do. ``model_served``: only a 200 counts, i.e.
    this gateway has read a live model's announcement (a worker having announced it does not mean every gateway
    has read it yet)."""
    try:
        with urllib.request.urlopen(gateway_url + "/readyz", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        with exc:
            if model_served:
                return False
            return exc.code == 503 and json.loads(exc.read() or b"{}").get("reason") == "no_model"
    except (OSError, ValueError):
        return False


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

    This proves what /readyz cannot: /readyz knows a worker announces a model whose requests topic exists, the
    probe that a worker consumes that topic and answers.
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
                    if name == EventName.DONE:
                        return ProbeResult(True, request_id, data["finish_reason"], first, time.monotonic() - began)
                    if name == EventName.ERROR:
                        detail = f"{data.get('code')}: {data.get('message')}"
                        return ProbeResult(False, request_id, detail, first, time.monotonic() - began)
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            # A quiet stream or a dropped connection: read it again from its start until the deadline.
            continue
    raise TimeoutError(f"no answer to the probe request {request_id} in {deadline_s:.0f} s")


def kafka_answers(bootstrap: str, timeout_s: float = 3.0, settings: Settings | None = None) -> bool:
    """True when a broker of ``bootstrap`` (comma-separated host:port) answers a metadata request; over TLS/SASL
    (``settings`` not PLAINTEXT) as the client of ``settings``, which also proves its credentials."""
    from services.local.broker.runner import metadata_ready, secure_broker_count

    if settings is not None and settings.kafka_security_protocol.upper() != "PLAINTEXT":
        return secure_broker_count(dataclasses.replace(settings, kafka_bootstrap=bootstrap), timeout_s) > 0

    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        if host and port.isdigit() and metadata_ready(host.strip("[]"), int(port), timeout_s=timeout_s):
            return True
    return False

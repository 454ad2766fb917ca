"""The chaos run's load: seeded clients of every kind that disconnect, resume on a random gateway and cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai

from bench.chaos_checks import Trace, reference_key
from gateway.fanout.sse import parse
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import InferenceRequest
from services.kafka import make_producer, record_headers, start_client
from services.settings import Settings

PROMPTS = (
    "The worker reads a request from the topic and",
    "Kafka keeps every event in a log so that",
    "A gateway sends tokens to the browser while",
    "The broker replicates each partition to",
    "Once upon a time there was a stream of tokens",
    "When a node fails, the cluster",
)
MAX_TOKENS = (16, 32, 48)
# Weights of the kinds of load (the mix is seeded, so a run replays with its seed).
MAX_CLIENT_ERRORS = 5  # tracebacks kept for the report
KINDS = {"native": 28, "cancel": 8, "native-batch": 10, "chat": 20, "responses": 17, "kafka": 17}
GREEDY_SHARE = 0.6
CLIENT_DEADLINE_S = 900.0
SUBMIT_ATTEMPTS = 8
RESPONSES_TERMINAL = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
    "response.cancelled": "cancelled",
}


def reference_cases() -> list[tuple[str, int]]:
    """Every (prompt, max_tokens) a greedy native request may use."""
    return [(p, n) for p in PROMPTS for n in MAX_TOKENS]


def greedy_references() -> dict[str, str]:
    """Greedy text of every case straight from the engine on the built-in model (no Kafka, an idle engine)."""
    from schemas.sampling import SamplingParams
    from workers.engine.engine import Engine
    from workers.engine.types import EngineRequest
    from workers.model.registry import ensure_default_model

    cases = reference_cases()
    engine = Engine.load(str(ensure_default_model(progress=False)), device="cpu", max_batch_size=len(cases))
    requests = [
        EngineRequest(str(i), engine.encode_prompt(p), SamplingParams(n, 0.0)) for i, (p, n) in enumerate(cases)
    ]
    out = engine.generate(requests)
    return {reference_key(p, n): out[str(i)][1] for i, (p, n) in enumerate(cases)}


@dataclass
class Load:
    """Runs clients until told to stop; keeps every accepted request's trace."""

    settings: Settings
    gateways: Sequence[str]
    rng: random.Random
    rate_per_s: float
    traces: list[Trace] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    client_errors: list[str] = field(default_factory=list)  # where a client's own unexpected failures came from
    submitted: Counter[str] = field(default_factory=Counter)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None
    _producer: Any = None
    _apis: dict[str, openai.AsyncOpenAI] = field(default_factory=dict)
    phases: dict[asyncio.Task[Any], str] = field(default_factory=dict)  # what each running client is doing

    def _at(self, what: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.phases[task] = what

    async def run(self, stop: asyncio.Event) -> None:
        """Start clients at the seeded rate until ``stop``; every client runs to its end (or its deadline)."""
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self._session = aiohttp.ClientSession(connector=connector)
        self._producer = make_producer(self.settings)
        await start_client(self._producer)
        kinds, weights = list(KINDS), list(KINDS.values())
        while not stop.is_set():
            kind = self.rng.choices(kinds, weights)[0]
            # Each client gets a generator of its own: its choices do not depend on when other clients run.
            client_rng = random.Random(self.rng.getrandbits(64))
            task = asyncio.create_task(self._client(kind, client_rng))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(lambda t: self.phases.pop(t, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.expovariate(self.rate_per_s))

    async def drain(self, timeout_s: float) -> int:
        """Wait for every client to end; returns how many were still running at the deadline (then cancelled)."""
        pending: set[asyncio.Task[None]] = set(self.tasks)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            _, pending = await asyncio.wait(pending, timeout=min(30.0, deadline - time.monotonic()))
            if pending:
                doing = Counter(self.phases.get(t, "?").split(" ", 1)[0] for t in pending)
                print(f"  {len(pending)} clients still running: {dict(doing)}", flush=True)
                for task in list(pending)[:3]:
                    print(f"    {self.phases.get(task, '?')}", flush=True)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for api in self._apis.values():
            await api.close()
        if self._session is not None:
            await self._session.close()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 60)
        return len(pending)

    # --- one client ---------------------------------------------------------------------------------------------

    async def _client(self, kind: str, rng: random.Random) -> None:
        prompt, max_tokens = rng.choice(PROMPTS), rng.choice(MAX_TOKENS)
        greedy = rng.random() < GREEDY_SHARE
        self.submitted[kind] += 1
        try:
            if kind == "chat":
                await self._chat(rng, prompt, max_tokens, greedy)
            elif kind == "responses":
                await self._responses(rng, prompt, max_tokens, greedy)
            else:
                await self._native(kind, rng, prompt, max_tokens, greedy)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a client's own failure is counted, never lost
            self.refused[f"{kind}: {type(exc).__name__}"] += 1
            if len(self.client_errors) < MAX_CLIENT_ERRORS:
                self.client_errors.append(f"{kind}: " + "".join(traceback.format_exception(exc, limit=-6)))

    def _gateway(self, rng: random.Random) -> str:
        return rng.choice(list(self.gateways))

    async def _submit_native(
        self, kind: str, rng: random.Random, prompt: str, max_tokens: int, greedy: bool
    ) -> str | None:
        """POST /v1/requests (a random gateway each try); the request id, or None when every try was refused."""
        assert self._session is not None
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0 if greedy else 0.8}
        if kind == "native-batch":
            body["priority"] = "batch"
        for _ in range(SUBMIT_ATTEMPTS):
            try:
                async with self._session.post(
                    self._gateway(rng) + "/v1/requests", json=body, timeout=aiohttp.ClientTimeout(total=60)
                ) as response:
                    if response.status == 202:
                        return str((await response.json())["id"])
                    self.refused[f"{kind}: HTTP {response.status}"] += 1
                    await response.read()
            except (aiohttp.ClientError, TimeoutError):
                # The answer was lost: the request may have been accepted all the same (the log check covers it).
                self.refused[f"{kind}: no answer"] += 1
            await asyncio.sleep(rng.uniform(0.5, 2.0))
        return None

    async def _submit_kafka(self, prompt: str, max_tokens: int, greedy: bool) -> str | None:
        """Write an InferenceRequest straight onto the requests topic, as a backend producer does."""
        rid = new_request_id()
        request = InferenceRequest(
            rid, prompt, max_tokens, temperature=0.0 if greedy else 0.8, created_ms=int(time.time() * 1000)
        )
        try:
            await asyncio.wait_for(
                await self._producer.send(
                    self.settings.requests_topic,
                    default_codec().encode(request),
                    key=rid.encode(),
                    headers=record_headers("InferenceRequest"),
                ),
                self.settings.producer_timeout_ms / 1000 + 30,
            )
        except Exception:
            self.refused["kafka: not acknowledged"] += 1
            return None
        return rid

    async def _native(self, kind: str, rng: random.Random, prompt: str, max_tokens: int, greedy: bool) -> None:
        self._at(f"{kind} submitting")
        if kind == "kafka":
            rid = await self._submit_kafka(prompt, max_tokens, greedy)
        else:
            rid = await self._submit_native(kind, rng, prompt, max_tokens, greedy)
        if rid is None:
            return
        trace = Trace(kind, rid, prompt, max_tokens, greedy and kind != "cancel")
        self.traces.append(trace)
        # Where the client cuts its connections: after this many events (0..3 cuts), and where it cancels.
        cuts = sorted(rng.randint(1, max_tokens + 2) for _ in range(rng.choice((0, 0, 1, 1, 2, 3))))
        cancel_at = rng.randint(1, max_tokens) if kind == "cancel" else None
        await self._follow(trace, rng, cuts, cancel_at)

    async def _follow(self, trace: Trace, rng: random.Random, cuts: list[int], cancel_at: int | None) -> None:
        """Read the native stream to its terminal event, reconnecting with the last id on a random gateway."""
        assert self._session is not None
        last_id: str | None = None
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        while time.monotonic() < deadline:
            url = f"{self._gateway(rng)}/v1/requests/{trace.request_id}/events"
            self._at(f"{trace.kind} following {url} ({len(trace.events)} events, {trace.resumes} resumes)")
            headers = {}
            if last_id is not None:
                if rng.random() < 0.3:  # a browser's first request carries the cursor in the query
                    url += f"?last_event_id={last_id}"
                else:
                    headers["Last-Event-ID"] = last_id
            try:
                async with self._session.get(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30)
                ) as response:
                    if response.status == 204:  # the cursor is at the end: only right after the terminal event
                        trace.failure = trace.failure or "204 before the client saw an end"
                        return
                    if response.status != 200:
                        await response.read()
                        await asyncio.sleep(rng.uniform(0.3, 1.0))
                        trace.resumes += 1
                        continue
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        buffer += chunk
                        end = buffer.rfind(b"\n\n")
                        if end < 0:
                            continue
                        complete, buffer = buffer[: end + 2], buffer[end + 2 :]
                        for ev in parse(complete.decode()):
                            if "event" not in ev:
                                continue
                            trace.see(time.monotonic())
                            if "id" in ev:
                                last_id = ev["id"]
                                trace.ids.append(ev["id"])
                            trace.events.append((ev["event"], ev.get("data", "")))
                            if ev["event"] in ("done", "error"):
                                trace.terminals += 1
                                trace.end = ev["event"]
                                if ev["event"] == "error":
                                    trace.failure = json.loads(ev.get("data") or "{}").get("code", "")
                                return
                            if cancel_at is not None and len(trace.events) >= cancel_at:
                                cancel_at = None
                                task = asyncio.create_task(self._cancel(trace, rng))
                                self.tasks.add(task)
                                task.add_done_callback(self.tasks.discard)
                        if cuts and len(trace.events) >= cuts[0]:
                            cuts.pop(0)
                            break  # the client drops the connection
            except (aiohttp.ClientError, TimeoutError, ConnectionError, UnicodeDecodeError):
                await asyncio.sleep(rng.uniform(0.2, 1.0))
            trace.resumes += 1

    async def _cancel(self, trace: Trace, rng: random.Random) -> None:
        assert self._session is not None
        trace.cancelled = True
        for _ in range(SUBMIT_ATTEMPTS):
            try:
                async with self._session.post(
                    f"{self._gateway(rng)}/v1/requests/{trace.request_id}/cancel",
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    await response.read()
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(rng.uniform(0.5, 2.0))

    def _api(self, url: str) -> openai.AsyncOpenAI:
        if url not in self._apis:
            self._apis[url] = openai.AsyncOpenAI(base_url=url + "/v1", api_key="chaos", max_retries=0, timeout=120)
        return self._apis[url]

    async def _chat(self, rng: random.Random, prompt: str, max_tokens: int, greedy: bool) -> None:
        """An OpenAI chat stream (the official SDK). It cannot resume: a cut leaves the client a prefix."""
        leave_at = rng.randint(1, max_tokens) if rng.random() < 0.1 else None
        url = self._gateway(rng)
        self._at(f"chat streaming from {url}")
        api = self._api(url)
        try:
            stream = await api.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0 if greedy else 0.8,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.APIError as exc:
            self.refused[f"chat: {getattr(exc, 'status_code', None) or type(exc).__name__}"] += 1
            return
        trace: Trace | None = None
        try:
            async for chunk in stream:
                if trace is None:
                    trace = Trace("chat", chunk.id.removeprefix("chatcmpl-"), prompt, max_tokens, False)
                    self.traces.append(trace)
                trace.see(time.monotonic())
                for choice in chunk.choices:
                    trace.text += choice.delta.content or ""
                    if choice.finish_reason is not None:
                        trace.terminals += 1
                        trace.end = choice.finish_reason
                if leave_at is not None and len(trace.arrivals) >= leave_at and not trace.end:
                    trace.cut = True
                    break
        except (openai.APIError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            if trace is not None:
                trace.cut = True
                if isinstance(exc, openai.APIError) and "restart" in str(exc):
                    trace.end, trace.failure, trace.cut = "failed", "restarted", False
        finally:
            await stream.close()

    async def _responses(self, rng: random.Random, prompt: str, max_tokens: int, greedy: bool) -> None:
        """A Responses background stream, resumed with ``starting_after`` on a random gateway after every cut."""
        cuts = sorted(rng.randint(1, max_tokens + 4) for _ in range(rng.choice((0, 1, 1, 2))))
        self._at("responses creating")
        try:
            stream = await self._api(self._gateway(rng)).responses.create(
                model="default",
                input=prompt,
                background=True,
                stream=True,
                max_output_tokens=max_tokens,
                temperature=0 if greedy else 0.8,
            )
        except openai.APIError as exc:
            self.refused[f"responses: {getattr(exc, 'status_code', None) or type(exc).__name__}"] += 1
            return
        trace: Trace | None = None
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        while True:
            try:
                async for raw in stream:
                    event: Any = raw
                    if trace is None:
                        rid = event.response.id  # response.created comes first
                        trace = Trace("responses", _request_id(rid), prompt, max_tokens, False)
                        trace.handle = rid
                        self.traces.append(trace)
                    trace.see(time.monotonic())
                    trace.seqs.append(event.sequence_number)
                    if event.type == "response.output_text.delta":
                        trace.text += event.delta
                    elif event.type in RESPONSES_TERMINAL:
                        trace.terminals += 1
                        trace.end = RESPONSES_TERMINAL[event.type]
                        error = getattr(event.response, "error", None)
                        trace.failure = getattr(error, "code", "") or ""
                        return
                    if cuts and len(trace.seqs) >= cuts[0]:
                        cuts.pop(0)
                        break
            except (openai.APIError, aiohttp.ClientError, ConnectionError, TimeoutError):
                await asyncio.sleep(rng.uniform(0.2, 1.0))
            finally:
                await stream.close()
            if trace is None or time.monotonic() > deadline:
                if trace is None:
                    self.refused["responses: lost before response.created"] += 1
                return
            trace.resumes += 1
            after = trace.seqs[-1] if trace.seqs else -1
            stream = await self._retry_retrieve(rng, trace.handle, after, deadline)
            if stream is None:
                return

    async def _retry_retrieve(self, rng: random.Random, response_id: str, after: int, deadline: float) -> Any:
        self._at(f"responses resuming {response_id} after {after}")
        while time.monotonic() < deadline:
            try:
                return await self._api(self._gateway(rng)).responses.retrieve(
                    response_id, stream=True, starting_after=after
                )
            except (openai.APIError, aiohttp.ClientError, ConnectionError, TimeoutError):
                await asyncio.sleep(rng.uniform(0.3, 1.0))
        return None


def _request_id(response_id: str) -> str:
    """The request id behind a response id (``resp_`` + the UUIDv7's 32 hex digits)."""
    from gateway.api.responses import request_id_of_response

    return request_id_of_response(response_id)

"""The async engine port the worker talks to (the seam of vLLM's EngineClient), and the adapter for step engines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from schemas.errors import EngineError
from schemas.sampling import SamplingParams
from workers.engine.types import EngineLike, EngineRequest, StepOutput, Turn

log = logging.getLogger(__name__)


class EnginePort(Protocol):
    """What the worker needs of an engine: tokenize, generate a stream of outputs per request, abort.

    ``generate`` yields the new tokens of each step and ends with exactly one output whose ``finish_reason`` is set
    (``stop``, ``length``, or ``aborted`` after ``abort``); it raises ``EngineRefused`` for a request the engine cannot
    do and ``EngineError`` when the engine fails. ``serve`` runs whatever the engine needs in the background until
    cancelled; ``close`` frees it.
    """

    kind: str  # the engine's registered name
    name: str
    max_positions: int
    has_chat_template: bool
    device: str

    def encode_prompt(
        self, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None
    ) -> list[int]: ...
    def prepare(self, params: SamplingParams) -> None:
        """Raise ``EngineRefused`` for what the engine cannot do (a schema its grammar cannot take), before the
        request starts; compiles what it can ahead of the run."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[StepOutput]: ...
    def abort(self, request_id: str) -> None: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    async def serve(self) -> None: ...
    def close(self) -> None: ...


class StepLoopPort:
    """An engine with a synchronous ``step()`` behind the port: its step loop runs in a thread of its own."""

    def __init__(self, engine: EngineLike):
        self.engine = engine
        self.kind = engine.kind
        self._queues: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._adds: list[EngineRequest] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{engine.name}")

    @property
    def name(self) -> str:
        return self.engine.name

    @name.setter
    def name(self, value: str) -> None:
        self.engine.name = value

    @property
    def max_positions(self) -> int:
        return self.engine.max_positions

    @property
    def has_chat_template(self) -> bool:
        return self.engine.has_chat_template

    @property
    def device(self) -> str:
        return str(getattr(self.engine, "device", "cpu"))

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def kv_cache_usage(self) -> float | None:
        """The engine's KV-cache fill (0 to 1), if it reports one."""
        usage = getattr(self.engine, "kv_cache_usage", None)
        return None if usage is None else float(usage)

    def encode_prompt(self, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None) -> list[int]:
        return self.engine.encode_prompt(prompt, messages, tools)

    def prepare(self, params: SamplingParams) -> None:
        self.engine.prepare(params)

    async def generate(self, request: EngineRequest) -> AsyncIterator[StepOutput]:
        rid = request.request_id
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = queue
        self._adds.append(request)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if self._queues.get(rid) is queue:
                del self._queues[rid]
            if not finished:  # the consumer went away (or the engine failed): the engine must let it go
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    async def serve(self) -> None:
        """Feed the engine what was added or aborted, step it, and hand out what it produced; forever."""
        loop = asyncio.get_running_loop()
        while True:
            self.feed()
            if not self.engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as exc:
                log.exception("engine step failed; failing the requests it was running")
                self._fail_all(exc)
                continue
            self.dispatch(outputs)

    def feed(self) -> None:
        """Hand the engine the requests added and aborted since the last step (one iteration of ``serve``)."""
        adds, self._adds = self._adds, []
        aborts, self._aborts = self._aborts, []
        for request in adds:
            try:
                self.engine.add(request)
            except Exception as exc:
                log.exception("engine refused run %s", request.request_id)
                self._put(request.request_id, exc)
        for run_id in aborts:
            try:
                self.engine.abort(run_id)
            except Exception:
                log.exception("engine could not abort run %s", run_id)

    def dispatch(self, outputs: list[StepOutput]) -> None:
        """Hand one step's outputs to the streams of their requests."""
        for out in outputs:
            self._put(out.request_id, out)

    def _put(self, request_id: str, item: StepOutput | BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _fail_all(self, exc: Exception) -> None:
        error = EngineError(f"engine step failed: {type(exc).__name__}")
        for rid in list(self._queues):
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
            self._put(rid, error)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def as_port(engine: EnginePort | EngineLike) -> EnginePort:
    """The engine behind the port: step engines (built-in, synthetic, test doubles) get the step-loop adapter."""
    return StepLoopPort(engine) if hasattr(engine, "step") else engine  # type: ignore[arg-type,return-value]

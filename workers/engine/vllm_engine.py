"""vLLM behind the worker's engine port: AsyncLLM in the worker process, token-id prompts, DELTA outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import psutil

from schemas.errors import ConfigError, EngineError, EngineRefused
from schemas.records import TokenLogprob, TopLogprob
from schemas.sampling import MAX_TOP_LOGPROBS, SamplingParams
from schemas.structured import Constraint, constraint_of
from workers.engine.text import TextCodec, TextStream
from workers.engine.types import EngineRequest, StepOutput, Turn, unsupported

if TYPE_CHECKING:
    from services.settings import Settings

log = logging.getLogger(__name__)

CPU_KV_CACHE_MB = 1024  # vLLM's CPU KV cache when TOKENRELAY_KV_CACHE_MB is 0
# What vLLM does beyond the basic sampling parameters (workers.engine.types.OPTIONS).
SUPPORTED = frozenset(
    {"presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "logprobs", "top_logprobs"}
    | {"response_format", "tools", "tool_choice"}
    | {"n"}
)


def engine_args(settings: Settings, model_path: str, device: str) -> dict[str, Any]:
    """AsyncEngineArgs of a served model from the settings (pure, for tests)."""
    args: dict[str, Any] = {
        "model": model_path,
        "dtype": "float32" if settings.dtype == "auto" and device == "cpu" else settings.dtype,
        "max_num_seqs": settings.max_batch_size,
        "enable_prefix_caching": True,
        "enforce_eager": settings.vllm_enforce_eager,
        "seed": 0,
        "disable_log_stats": True,
        # Logprobs of the distribution the token was drawn from (after bias, penalties and temperature), as the
        # built-in engine gives them; vLLM's default is the raw model's.
        "logprobs_mode": "processed_logprobs",
        "max_logprobs": MAX_TOP_LOGPROBS,
        # Structured outputs as the built-in engine makes them: xgrammar, compact JSON (no free whitespace that a
        # model could pad its answer with up to max_tokens; vLLM reads this per engine, not per request).
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if settings.kv_cache_mb:
        args["kv_cache_memory_bytes"] = settings.kv_cache_mb << 20
    elif device == "cpu":
        args["kv_cache_memory_bytes"] = CPU_KV_CACHE_MB << 20
    else:
        args["gpu_memory_utilization"] = settings.vllm_gpu_memory_utilization
    return args


def sampling_params(params: SamplingParams, max_tokens: int) -> Any:
    """vLLM's SamplingParams for ours; stop strings stay with the worker (they must see an earlier run's text)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    refusal = unsupported(params, SUPPORTED, "vLLM")
    if refusal is not None:
        raise refusal
    constraint = constraint_of(params.response_format, params.tools, params.tool_choice)
    try:
        return VllmSamplingParams(
            structured_outputs=structured_outputs(constraint) if constraint is not None else None,
            n=params.n,
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=params.bias() or None,
            logprobs=params.top_logprobs if params.logprobs else None,
            seed=params.seed,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
        )
    except (ValueError, VLLMValidationError) as exc:  # say which parameter it cannot take (e.g. n > 1 when greedy)
        raise EngineRefused(f"the vLLM engine cannot take these sampling parameters: {exc}") from exc


def structured_outputs(constraint: Constraint) -> Any:
    """vLLM's structured outputs for a constraint: the same JSON schema (compact, as the built-in engine writes it)
    or xgrammar structural tag."""
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json_schema":
        return StructuredOutputsParams(json=constraint.spec, disable_any_whitespace=True)
    return StructuredOutputsParams(structural_tag=constraint.spec)


class VllmEngine:
    """One served model on vLLM's AsyncLLM; the worker tokenizes, vLLM generates, the worker detokenizes."""

    kind = "vllm"

    def __init__(self, llm: Any, codec: TextCodec, name: str, device: str, eos_ids: frozenset[int]):
        self.llm = llm
        self.codec = codec
        self.name = name
        self.device = device
        self.eos_ids = eos_ids
        self.max_positions = int(llm.model_config.max_model_len)
        self.has_chat_template = codec.has_chat_template
        self._live: set[str] = set()
        self._aborted: set[str] = set()
        self._aborts: set[asyncio.Task[None]] = set()
        self.reaper: Reaper | None = None

    @property
    def num_running(self) -> int:
        return len(self._live)

    @property
    def num_waiting(self) -> int:
        return 0  # vLLM queues inside; every request handed to it counts as running here

    def encode_prompt(self, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None) -> list[int]:
        return self.codec.encode_prompt(prompt, messages, tools)

    def prepare(self, params: SamplingParams) -> None:
        """Refuse what this engine does not do before the request starts; vLLM checks a constraint itself when it
        gets the request (an error then fails the run)."""
        refusal = unsupported(params, SUPPORTED, "vLLM")
        if refusal is not None:
            raise refusal

    async def generate(self, request: EngineRequest) -> AsyncIterator[StepOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        rid = request.request_id
        done = len(request.resume_ids)
        p = request.params
        if done and constraint_of(p.response_format, p.tools, p.tool_choice) is not None:
            # vLLM would start the grammar over at the continued tokens (they are prompt to it): refuse, not garble.
            raise EngineRefused("the vLLM engine cannot continue a structured output after a worker death")
        n = request.params.n
        # A continued run: the earlier runs' tokens extend the prompt (exact for greedy requests). With n > 1 choices
        # vLLM prefills the prompt once and forks it for each choice; each choice has its own text.
        params = sampling_params(request.params, request.params.max_tokens - done)
        texts = [TextStream(self.codec, request.params.stop, request.resume_ids, request.resume_text) for _ in range(n)]
        ended: dict[int, str] = {}
        prompt = {"prompt_token_ids": [*request.prompt_ids, *request.resume_ids]}
        self._live.add(rid)
        outputs = self.llm.generate(prompt, params, rid)
        try:
            async for out in outputs:
                steps: list[StepOutput] = []
                for completion in out.outputs:
                    index = int(getattr(completion, "index", 0))
                    if index in ended:
                        continue  # cut by a stop string here while vLLM went on
                    ids = list(completion.token_ids)
                    reason = completion.finish_reason
                    if reason == "stop" and completion.stop_reason is None and ids and ids[-1] in self.eos_ids:
                        ids.pop()  # the end-of-sequence token is not part of the answer (as in the built-in engine)
                    top = request.params.top_logprobs
                    logprobs = tuple(self.codec.with_bytes(lp) for lp in _logprobs(ids, completion.logprobs, top))
                    step = _step_output(rid, ids, texts[index], reason, logprobs)
                    if step.finish_reason is not None:
                        ended[index] = step.finish_reason
                    steps.append(dataclasses.replace(step, finish_reason=None, index=index))
                aborted = rid in self._aborted and len(ended) < n
                if aborted or len(ended) == n:
                    if aborted:  # every choice still running ends here, with what it holds back
                        for index in range(n):
                            if index not in ended:
                                ended[index] = "aborted"
                                steps.append(StepOutput(rid, (), texts[index].final(), index=index))
                    last = steps[-1] if steps else StepOutput(rid, (), "")
                    reasons = tuple(ended[i] for i in range(n))
                    steps[-1:] = [
                        dataclasses.replace(
                            last,
                            finish_reason="aborted" if aborted else reasons[0],
                            choice_finish_reasons=reasons if n > 1 else (),
                        )
                    ]
                for step in steps:
                    yield step
                if aborted or len(ended) == n:
                    return
        except VLLMClientError as exc:
            raise EngineRefused(f"the vLLM engine refused the request: {exc}") from exc
        except EngineDeadError as exc:
            raise EngineError("the vLLM engine died") from exc
        finally:
            self._live.discard(rid)
            self._aborted.discard(rid)
            await outputs.aclose()  # a run left early (a stop string, an abort): vLLM aborts the request

    def abort(self, request_id: str) -> None:
        if request_id not in self._live:
            return
        self._aborted.add(request_id)
        task = asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def serve(self) -> None:
        """Nothing to run: AsyncLLM runs its own output handler (a dead engine fails each run in ``generate``)."""
        await asyncio.Event().wait()

    def close(self) -> None:
        self.llm.shutdown()
        if self.reaper is not None:
            self.reaper.release()


class Reaper:
    """vLLM's engine core processes watch no parent: a worker that is SIGKILLed would leave them running (holding
    the model, the KV cache and a core). A small watchdog process kills them when the worker's end of a pipe closes
    without the worker having said goodbye (``release``)."""

    CODE = (
        "import os, signal, sys\n"
        "if os.read(0, 1) == b'':\n"
        "    for pid in sys.argv[1:]:\n"
        "        try:\n"
        "            os.kill(int(pid), signal.SIGKILL)\n"
        "        except OSError:\n"
        "            pass\n"
    )

    def __init__(self, pids: Sequence[int]):
        read, self._write = os.pipe()  # not inherited by vLLM's later children (non-inheritable by default)
        with os.fdopen(read, "rb", buffering=0) as stdin:
            subprocess.Popen([sys.executable, "-c", self.CODE, *map(str, pids)], stdin=stdin, start_new_session=True)

    def release(self) -> None:
        """A clean stop: the engine shut its processes down itself; the watchdog leaves without killing."""
        os.write(self._write, b"x")
        os.close(self._write)


def _logprobs(ids: list[int], positions: Any, top: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position logprobs (a dict of token id -> Logprob with its rank, holding the sampled token and the
    ``top`` likeliest) as ours; empty when the request asked for none."""
    if not positions:
        return ()
    out = []
    for token, entries in zip(ids, positions, strict=False):
        ranked = sorted((e.rank, t, e.logprob) for t, e in entries.items() if e.rank is not None and e.rank <= top)
        chosen = entries[token].logprob if token in entries else float("-inf")
        out.append(TokenLogprob(token, float(chosen), tuple(TopLogprob(t, float(lp)) for _, t, lp in ranked)))
    return tuple(out)


def _step_output(
    rid: str, ids: list[int], text: TextStream, reason: str | None, logprobs: tuple[TokenLogprob, ...] = ()
) -> StepOutput:
    """One vLLM delta as our output: token by token through the text stream, ending at a stop string."""
    emitted = ""
    for i, token in enumerate(ids):
        piece, stopped = text.push(token)
        emitted += piece
        if stopped:
            return StepOutput(rid, tuple(ids[: i + 1]), emitted, "stop", logprobs=logprobs[: i + 1])
    if reason is None:
        return StepOutput(rid, tuple(ids), emitted, logprobs=logprobs)
    finish = {"stop": "stop", "length": "length", "abort": "aborted"}.get(reason)
    if finish is None:
        raise EngineError(f"the vLLM engine ended a request with {reason!r}")
    return StepOutput(rid, tuple(ids), emitted + text.final(), finish, logprobs=logprobs)


def load(settings: Settings, name: str, source: str) -> VllmEngine:
    """The vLLM engine of one served model (its registry entry)."""
    try:
        from transformers import AutoTokenizer
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise ConfigError(
            f"model {name!r} asks for the vLLM engine, which is not installed: pip install 'tokenrelay[vllm]' "
            "on GPU machines, `make vllm-venv` on CPU machines"
        ) from exc
    from workers.model.registry import resolve_model

    path = resolve_model(source)
    device = str(current_platform.device_type or "cpu")
    args = engine_args(settings, path, device)
    log.info("model %s: starting vLLM on %s (%s)", name, device, args)
    args["structured_outputs_config"] = StructuredOutputsConfig(**args["structured_outputs_config"])
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    generation_eos = llm.model_config.hf_config.eos_token_id
    if isinstance(generation_eos, int):
        eos.add(generation_eos)
    elif isinstance(generation_eos, list | tuple):
        eos.update(int(t) for t in generation_eos)
    engine = VllmEngine(llm, TextCodec(tokenizer), name, device, frozenset(eos))
    engine.reaper = Reaper([child.pid for child in psutil.Process().children(recursive=True)])
    return engine

"""The engine loop of one step: schedule, prefill the new rows, decode the running ones, sample, detokenize."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from schemas.errors import EngineError
from schemas.sampling import SamplingParams
from schemas.structured import constraint_of
from workers.engine.architectures import check_architecture, context_length
from workers.engine.attention import register as register_attention
from workers.engine.constraints import Grammars, Matcher, mask
from workers.engine.cpu_linear import can_pack, pack_linears
from workers.engine.port import StepLoopPort
from workers.engine.resources import default_kv_cache_bytes, set_torch_threads
from workers.engine.runner import ModelRunner, pick_device
from workers.engine.sampling import RowSampler, sample
from workers.engine.scheduler import Scheduler
from workers.engine.text import TextCodec, TextStream
from workers.engine.types import EngineRequest, StepOutput, Turn

if TYPE_CHECKING:
    from services.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Seq:
    request: EngineRequest
    sampler: RowSampler
    text: TextStream
    completion: int
    prompt: list[int]
    reserve: int
    matcher: Matcher | None = None  # the request's grammar, when its output is constrained
    next_token: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


class Engine:
    """Continuous batching over a transformers causal LM; call ``step()`` from one thread only."""

    kind = "model"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        max_batch_size: int,
        name: str = "",
        kv_cache_bytes: int = 0,
        prefill_chunk_tokens: int = 512,
    ):
        check_architecture(model)
        model.set_attn_implementation(register_attention())
        if can_pack(device, model.dtype):
            pack_linears(model, max_batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_positions = context_length(model.config)
        self.codec = TextCodec(tokenizer)
        self.has_chat_template = self.codec.has_chat_template
        self._grammars: Grammars | None = None
        budget_bytes = kv_cache_bytes or default_kv_cache_bytes(device)
        self.runner = ModelRunner(model, device, 1 << 62, max_batch_size)
        per_token = self.runner.bytes_per_token
        self.kv_budget_tokens = budget_bytes // per_token
        if self.kv_budget_tokens < self.max_positions:
            log.warning(
                "KV budget of %d MiB holds %d tokens, less than one context (%d); raised to one context",
                budget_bytes >> 20,
                self.kv_budget_tokens,
                self.max_positions,
            )
            self.kv_budget_tokens = self.max_positions
        self.runner.budget_tokens = self.kv_budget_tokens
        self.scheduler: Scheduler[_Seq] = Scheduler(max_batch_size, prefill_chunk_tokens, self.kv_budget_tokens)
        log.info(
            "engine %s: KV budget %d tokens (%d MiB, %d KiB/token), prefill chunk %d tokens",
            self.name,
            self.kv_budget_tokens,
            self.kv_budget_tokens * per_token >> 20,
            per_token >> 10,
            prefill_chunk_tokens,
        )

    @classmethod
    def load(
        cls,
        model_path: str,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 32,
        *,
        kv_cache_mb: int = 0,
        prefill_chunk_tokens: int = 512,
        torch_threads: int = 0,
    ) -> Engine:
        """Load a local transformers causal-LM directory (or cached hub id); 0 means automatic for the knobs."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        set_torch_threads(torch_threads)
        dev, dt = pick_device(device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dt)
        model = model.to(dev).eval()  # type: ignore[arg-type]
        log.info("loaded model %s on %s (%s), %d torch threads", model_path, dev, dt, torch.get_num_threads())
        return cls(
            model,
            tokenizer,
            dev,
            max_batch_size,
            name=model_path,
            kv_cache_bytes=kv_cache_mb << 20,
            prefill_chunk_tokens=prefill_chunk_tokens,
        )

    @classmethod
    def from_settings(cls, settings: Settings, model_path: str) -> Engine:
        """The engine as the settings describe it (device, dtype, batch, KV budget, prefill chunk, threads)."""
        return cls.load(
            model_path,
            settings.device,
            settings.dtype,
            settings.max_batch_size,
            kv_cache_mb=settings.kv_cache_mb,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            torch_threads=settings.torch_threads,
        )

    @property
    def context_length(self) -> int:
        return self.max_positions

    def encode_prompt(self, prompt: str, messages: Sequence[Turn] | None = None, tools: str | None = None) -> list[int]:
        return self.codec.encode_prompt(prompt, messages, tools)

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(ids)

    @property
    def grammars(self) -> Grammars:
        """The compiler of this model's constraints (its tokenizer's vocabulary is read on first use)."""
        if self._grammars is None:
            vocab = int(self.model.config.get_text_config().vocab_size)
            self._grammars = Grammars(self.tokenizer, vocab, self.eos_ids)
        return self._grammars

    def prepare(self, params: SamplingParams) -> None:
        """Compile the request's constraint now (cached), so that a schema the grammar cannot take is refused
        before the request starts: EngineRefused."""
        constraint = constraint_of(params.response_format, params.tools, params.tool_choice)
        if constraint is not None:
            self.grammars.compile(constraint)

    def add(self, request: EngineRequest) -> None:
        prompt = request.prompt_ids + request.resume_ids
        if not request.prompt_ids or len(prompt) >= self.max_positions:
            # The worker's admission refuses these; past it they would write outside the cache.
            raise EngineError(f"a prompt of {len(prompt)} tokens does not fit a context of {self.max_positions}")
        completion = len(request.resume_ids)
        reserve = min(self.max_positions, len(prompt) + max(1, request.params.max_tokens - completion))
        params = request.params
        constraint = constraint_of(params.response_format, params.tools, params.tool_choice)
        seq = _Seq(
            request,
            RowSampler(request.params),
            TextStream(self.codec, request.params.stop, request.resume_ids, request.resume_text),
            completion,
            prompt,
            reserve,
            # A continued run replays the tokens the log holds through the grammar: its state is where they left it.
            self.grammars.matcher(constraint, request.resume_ids) if constraint is not None else None,
        )
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV budget the running requests reserve (0 to 1)."""
        return self.scheduler.kv_reserved() / self.kv_budget_tokens

    def step(self) -> list[StepOutput]:
        """One iteration: running requests advance one token, prompts advance one chunk (their last gives a token)."""
        plan = self.scheduler.schedule()
        outputs = [StepOutput(s.request_id, (), self._final_text(s, ""), "aborted") for s in plan.aborted]
        for seq in plan.aborted:
            self.runner.remove(seq.request_id)
        if plan.admitted:
            widest = max(s.reserve for s in self.scheduler.running)
            for seq in plan.admitted:
                self.runner.add(seq.request_id, widest)
        rows: list[_Seq] = []
        logits: list[torch.Tensor] = []
        if plan.decode:
            logits.append(
                self.runner.decode([s.request_id for s in plan.decode], [s.next_token or 0 for s in plan.decode])
            )
            rows.extend(plan.decode)
        if plan.prefill:
            chunks = [c.seq.prompt[c.start : c.start + c.length] for c in plan.prefill]
            want = [c.last for c in plan.prefill]
            logits.append(self.runner.prefill([c.seq.request_id for c in plan.prefill], chunks, want))
            rows.extend(c.seq for c in plan.prefill if c.last)
        if not rows:
            return outputs
        scores = torch.cat(logits, dim=0)
        mask(scores, [s.matcher for s in rows])
        tokens = sample(scores, [s.sampler for s in rows])
        outputs.extend(self._advance(seq, token) for seq, token in zip(rows, tokens, strict=True))
        finished = {o.request_id for o in outputs if o.finish_reason is not None}
        for seq in rows:
            if seq.request_id in finished:
                self.scheduler.finish(seq)
                self.runner.remove(seq.request_id)
        return outputs

    def _advance(self, seq: _Seq, token: int) -> StepOutput:
        if seq.matcher is not None and not seq.matcher.accept(token):
            # Only a grammar that already ended allows nothing (the mask left every logit at -inf): end it there.
            log.error("run %s: token %d is outside its grammar; stopping the run", seq.request_id, token)
            return StepOutput(seq.request_id, (), self._final_text(seq, ""), "stop")
        if token in self.eos_ids:
            return StepOutput(seq.request_id, (), self._final_text(seq, ""), "stop")
        seq.completion += 1
        seq.next_token = token
        text, stopped = seq.text.push(token)
        if stopped:
            return StepOutput(seq.request_id, (token,), text, "stop")
        total = len(seq.request.prompt_ids) + seq.completion
        if seq.completion >= seq.request.params.max_tokens or total >= self.max_positions:
            return StepOutput(seq.request_id, (token,), self._final_text(seq, text), "length")
        return StepOutput(seq.request_id, (token,), text)

    @staticmethod
    def _final_text(seq: _Seq, text: str) -> str:
        return text + seq.text.final()

    def generate(self, requests: Sequence[EngineRequest]) -> dict[str, tuple[list[int], str, str]]:
        """Run requests to completion: id → (token ids, text, finish reason). For tests and benchmarks."""
        for request in requests:
            self.add(request)
        results: dict[str, tuple[list[int], str, str]] = {r.request_id: ([], "", "") for r in requests}
        while self.has_work():
            for out in self.step():
                ids, text, _ = results[out.request_id]
                results[out.request_id] = (ids + list(out.token_ids), text + out.text, out.finish_reason or "")
        return results


def load(settings: Settings, name: str, source: str) -> StepLoopPort:
    """The built-in engine of one served model behind the engine port (its registry entry)."""
    from workers.model.registry import resolve_model

    engine = Engine.from_settings(settings, resolve_model(source))
    engine.name = name
    return StepLoopPort(engine)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)

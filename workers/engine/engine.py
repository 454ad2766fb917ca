"""The engine loop of one step: schedule, prefill the new rows, decode the running ones, sample, detokenize."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from schemas.errors import EngineError, EngineRefused
from schemas.sampling import SamplingParams
from schemas.structured import constraint_of
from workers import metrics
from workers.engine.architectures import check_architecture, context_length
from workers.engine.attention import register as register_attention
from workers.engine.constraints import Grammars, Matcher, mask
from workers.engine.cpu_linear import can_pack, pack_linears
from workers.engine.port import StepLoopPort
from workers.engine.resources import default_kv_cache_bytes, set_torch_threads
from workers.engine.runner import ModelRunner, pick_device
from workers.engine.sampling import RowSampler, Sampled, sample_rows
from workers.engine.scheduler import Scheduler
from workers.engine.text import TextCodec, TextStream
from workers.engine.types import EngineRequest, StepOutput, Turn, unsupported

if TYPE_CHECKING:
    from services.settings import Settings

log = logging.getLogger(__name__)


# What the built-in engine does beyond the basic sampling parameters (workers.engine.types.OPTIONS).
SUPPORTED = frozenset(
    {"presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "n"}
    | {"logprobs", "top_logprobs"}
    | {"response_format", "tools", "tool_choice"}
)


@dataclass(slots=True)
class _Choice:
    """One of a request's n choices: its cache row (choice 0's is the request's own), sampler and text."""

    index: int
    row_id: str
    sampler: RowSampler
    text: TextStream
    completion: int
    matcher: Matcher | None = None  # the choice's place in the request's grammar, when its output is constrained
    next_token: int | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class _Seq:
    """A request as the scheduler sees it: one prompt, prefilled once, then ``rows`` choices decoding."""

    request: EngineRequest
    choices: list[_Choice]
    prompt: list[int]
    reserve: int

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def rows(self) -> int:
        return len(self.choices)

    @property
    def urgent(self) -> bool:
        return self.request.urgent

    def live(self) -> list[_Choice]:
        return [c for c in self.choices if c.finish_reason is None]


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
        """Refuse what this engine does not do, and compile the request's constraint now (cached), so that a schema
        the grammar cannot take is refused before the request starts: EngineRefused."""
        refusal = unsupported(params, SUPPORTED, "built-in")
        if refusal is not None:
            raise refusal
        try:
            constraint = constraint_of(params.response_format, params.tools, params.tool_choice)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a record written past the gateway's checks
            raise EngineRefused(
                f"response_format, tools or tool_choice is malformed: {exc}", code="response_format_invalid"
            ) from None
        if constraint is not None:
            self.grammars.compile(constraint)

    def add(self, request: EngineRequest) -> None:
        prompt = request.prompt_ids + request.resume_ids
        if not request.prompt_ids or len(prompt) >= self.max_positions:
            # The worker's admission refuses these; past it they would write outside the cache.
            raise EngineError(f"a prompt of {len(prompt)} tokens does not fit a context of {self.max_positions}")
        params = request.params
        refusal = unsupported(params, SUPPORTED, "built-in")
        if refusal is not None:
            raise refusal
        vocab = self.model.config.vocab_size
        if any(token >= vocab for token in params.bias()):
            raise EngineRefused(f"logit_bias names a token id outside the vocabulary of {vocab} tokens")
        completion = len(request.resume_ids)
        reserve = min(self.max_positions, len(prompt) + max(1, params.max_tokens - completion))
        constraint = constraint_of(params.response_format, params.tools, params.tool_choice)
        choices = [
            _Choice(
                index,
                request.request_id if index == 0 else f"{request.request_id}#{index}",
                RowSampler(params, request.prompt_ids, request.resume_ids, index),
                TextStream(self.codec, params.stop, request.resume_ids, request.resume_text),
                completion,
                # A continued run replays the tokens the log holds through the grammar: its state is where they left it.
                self.grammars.matcher(constraint, request.resume_ids) if constraint is not None else None,
            )
            for index in range(params.n)
        ]
        self.scheduler.add(_Seq(request, choices, prompt, reserve))

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
        outputs: list[StepOutput] = []
        for seq in plan.aborted:
            live = seq.live()
            for choice in live:
                choice.finish_reason = "aborted"
            ends = [StepOutput(seq.request_id, (), c.text.final(), index=c.index) for c in live]
            ends = ends or [StepOutput(seq.request_id, (), "")]
            ends[-1] = self._last(seq, ends[-1], "aborted")
            outputs.extend(ends)
            for choice in seq.choices:
                self.runner.remove(choice.row_id)
        if plan.admitted:
            widest = max(s.reserve for s in self.scheduler.running)
            for seq in plan.admitted:
                self.runner.add(seq.request_id, widest)
        rows: list[tuple[_Seq, _Choice]] = []
        logits: list[torch.Tensor] = []
        if plan.decode:
            decoding = [(seq, c) for seq in plan.decode for c in seq.live()]
            logits.append(self.runner.decode([c.row_id for _, c in decoding], [c.next_token or 0 for _, c in decoding]))
            rows.extend(decoding)
        if plan.prefill:
            chunks = [c.seq.prompt[c.start : c.start + c.length] for c in plan.prefill]
            want = [c.last for c in plan.prefill]
            metrics.PREFILL_TOKENS.inc(sum(len(c) for c in chunks))
            prefilled = self.runner.prefill([c.seq.request_id for c in plan.prefill], chunks, want)
            ended = [c.seq for c in plan.prefill if c.last]
            for seq in ended:  # each further choice starts from a copy of the prompt's cache: one prefill for n
                for choice in seq.choices[1:]:
                    self.runner.fork(seq.request_id, choice.row_id)
            if any(seq.rows > 1 for seq in ended):  # every choice samples its first token from the prompt's logits
                each = [i for i, seq in enumerate(ended) for _ in range(seq.rows)]
                prefilled = prefilled.index_select(0, torch.tensor(each, device=prefilled.device))
            logits.append(prefilled)
            rows.extend((seq, c) for seq in ended for c in seq.choices)
        if not rows:
            return outputs
        scores = torch.cat(logits, dim=0)
        mask(scores, [c.matcher for _, c in rows])  # only constrained rows pay
        picks = sample_rows(scores, [c.sampler for _, c in rows])
        for (seq, choice), picked in zip(rows, picks, strict=True):
            out = self._advance(seq, choice, picked)
            if choice.finish_reason is not None:
                self.runner.remove(choice.row_id)
                if not seq.live():
                    self.scheduler.finish(seq)
                    out = self._last(seq, out)
            outputs.append(out)
        return outputs

    def _advance(self, seq: _Seq, choice: _Choice, picked: Sampled) -> StepOutput:
        """The output of one choice's new token; sets the choice's finish reason when it ends."""
        token = picked.token
        logprobs = (self.codec.with_bytes(picked.logprob),) if picked.logprob is not None else ()
        rid, index = seq.request_id, choice.index
        if choice.matcher is not None and not choice.matcher.accept(token):
            # Only a grammar that already ended allows nothing (the mask left every logit at -inf): end it there.
            log.error("run %s: token %d is outside its grammar; stopping the choice", rid, token)
            choice.finish_reason = "stop"
            return StepOutput(rid, (), choice.text.final(), index=index)
        if token in self.eos_ids:
            choice.finish_reason = "stop"
            return StepOutput(rid, (), choice.text.final(), index=index)
        choice.completion += 1
        choice.next_token = token
        text, stopped = choice.text.push(token)
        if stopped:
            choice.finish_reason = "stop"
            return StepOutput(rid, (token,), text, index=index, logprobs=logprobs)
        total = len(seq.request.prompt_ids) + choice.completion
        if choice.completion >= seq.request.params.max_tokens or total >= self.max_positions:
            choice.finish_reason = "length"
            return StepOutput(rid, (token,), text + choice.text.final(), index=index, logprobs=logprobs)
        return StepOutput(rid, (token,), text, index=index, logprobs=logprobs)

    @staticmethod
    def _last(seq: _Seq, out: StepOutput, reason: str | None = None) -> StepOutput:
        """The request's last output: it ends the request with ``reason`` or choice 0's (and, for n > 1, each
        choice's in ``choice_finish_reasons``)."""
        reasons = tuple(c.finish_reason or "aborted" for c in seq.choices)
        return StepOutput(
            out.request_id,
            out.token_ids,
            out.text,
            reason or reasons[0],
            out.index,
            out.logprobs,
            reasons if len(reasons) > 1 else (),
        )

    def generate(self, requests: Sequence[EngineRequest]) -> dict[str, tuple[list[int], str, str]]:
        """Run requests to completion: id → (token ids, text, finish reason). For tests and benchmarks."""
        for request in requests:
            self.add(request)
        results: dict[str, tuple[list[int], str, str]] = {r.request_id: ([], "", "") for r in requests}
        while self.has_work():
            for out in self.step():
                if out.index:
                    continue  # choice 0's only
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

"""The engine loop of one step: schedule, prefill the new rows, decode the running ones, sample, detokenize."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.runner import ModelRunner, pick_device
from workers.engine.sampling import RowSampler, sample
from workers.engine.scheduler import Scheduler
from workers.engine.stops import StopMatcher
from workers.engine.types import EngineRequest, StepOutput

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Seq:
    request: EngineRequest
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopMatcher
    completion: int
    next_token: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Engine:
    """Continuous batching over a transformers causal LM; call ``step()`` from one thread only."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, max_batch_size: int, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.scheduler: Scheduler[_Seq] = Scheduler(max_batch_size)
        self.runner = ModelRunner(model, device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._rust = getattr(tokenizer, "_tokenizer", None)
        self.has_chat_template = getattr(tokenizer, "chat_template", None) is not None

    @classmethod
    def load(cls, model_path: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 32) -> Engine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev, dt = pick_device(device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dt)
        model = model.to(dev).eval()  # type: ignore[arg-type]
        log.info("loaded model %s on %s (%s)", model_path, dev, dt)
        return cls(model, tokenizer, dev, max_batch_size, name=model_path)

    def encode_prompt(self, prompt: str, messages: Sequence[tuple[str, str]] | None = None) -> list[int]:
        if messages:
            chat = [{"role": role, "content": content} for role, content in messages]
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in self.tokenizer(prompt)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        if self._rust is not None:
            return str(self._rust.decode(list(ids), skip_special_tokens=True))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def add(self, request: EngineRequest) -> None:
        detok = IncrementalDetokenizer(self.decode, request.resume_ids, request.resume_text)
        seq = _Seq(
            request, RowSampler(request.params), detok, StopMatcher(request.params.stop), len(request.resume_ids)
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

    def step(self) -> list[StepOutput]:
        """One iteration: every running request advances by one token; new requests get their first token."""
        plan = self.scheduler.schedule()
        outputs = [StepOutput(s.request_id, (), self._final_text(s, ""), "aborted") for s in plan.aborted]
        if plan.aborted:
            self.runner.keep([s.request_id for s in plan.running])
        rows: list[_Seq] = []
        logits: list[torch.Tensor] = []
        if plan.running:
            logits.append(self.runner.decode([s.next_token or 0 for s in plan.running]))
            rows.extend(plan.running)
        if plan.admitted:
            prompts = [s.request.prompt_ids + s.request.resume_ids for s in plan.admitted]
            logits.append(self.runner.prefill([s.request_id for s in plan.admitted], prompts))
            rows.extend(plan.admitted)
        if not rows:
            return outputs
        tokens = sample(torch.cat(logits, dim=0), [s.sampler for s in rows])
        outputs.extend(self._advance(seq, token) for seq, token in zip(rows, tokens, strict=True))
        finished = {o.request_id for o in outputs if o.finish_reason is not None}
        if finished:
            for seq in rows:
                if seq.request_id in finished:
                    self.scheduler.finish(seq)
            self.runner.keep([s.request_id for s in self.scheduler.running])
        return outputs

    def _advance(self, seq: _Seq, token: int) -> StepOutput:
        if token in self.eos_ids:
            return StepOutput(seq.request_id, (), self._final_text(seq, ""), "stop")
        seq.completion += 1
        seq.next_token = token
        text, stopped = seq.stops.feed(seq.detok.push([token]))
        if stopped:
            return StepOutput(seq.request_id, (token,), text, "stop")
        total = len(seq.request.prompt_ids) + seq.completion
        if seq.completion >= seq.request.params.max_tokens or total >= self.max_positions:
            return StepOutput(seq.request_id, (token,), self._final_text(seq, text), "length")
        return StepOutput(seq.request_id, (token,), text)

    @staticmethod
    def _final_text(seq: _Seq, text: str) -> str:
        tail, stopped = seq.stops.feed(seq.detok.flush())
        return text + tail + ("" if stopped else seq.stops.flush())

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

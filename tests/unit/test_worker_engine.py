"""Engine: greedy == generate(), seeded sampling, cancel, continuation, detokenizer, stop strings, KV budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.sampling import SamplingParams
from tests.tinymodel import build_tiny_model
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.engine import Engine
from workers.engine.stops import StopMatcher
from workers.engine.types import EngineRequest


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _greedy_reference(engine: Engine, reference: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    out = reference.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens)
    ids = out[0, len(prompt_ids) :].tolist()
    return [t for t in ids if t not in engine.eos_ids]


def test_greedy_equals_generate_with_requests_joining_and_leaving(engine: Engine, reference: Any) -> None:
    prompts = ["Hello", "The quick brown fox jumps over", "Café 日本", "x", "Kafka is a distributed log", "🚀"]
    requests = [
        EngineRequest(f"r{i}", engine.encode_prompt(p), SamplingParams(max_tokens=5 + 4 * i, temperature=0))
        for i, p in enumerate(prompts)
    ]
    # Six requests through a batch of four: rows leave at different lengths and waiting ones join mid-flight.
    results = engine.generate(requests)
    for request in requests:
        ids, text, reason = results[request.request_id]
        assert ids == _greedy_reference(engine, reference, request.prompt_ids, request.params.max_tokens)
        assert text == engine.decode(ids)
        assert reason in ("length", "stop")


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    prompt = engine.encode_prompt("Hello world")
    alone = engine.generate([EngineRequest("a", prompt, params)])["a"][0]
    again = engine.generate([EngineRequest("b", prompt, params)])["b"][0]
    other = engine.generate([EngineRequest("c", prompt, SamplingParams(max_tokens=12, temperature=0.9, seed=99))])
    assert alone == again
    assert other["c"][0] != alone


def test_cancel_stops_within_one_step(engine: Engine) -> None:
    engine.add(EngineRequest("x", engine.encode_prompt("Hello"), SamplingParams(max_tokens=50, temperature=0)))
    first = engine.step()
    assert [o.request_id for o in first] == ["x"] and first[0].finish_reason is None
    engine.abort("x")
    out = engine.step()
    assert [(o.request_id, o.finish_reason, o.token_ids) for o in out] == [("x", "aborted", ())]
    assert not engine.has_work()


def test_continuation_equals_uninterrupted_greedy(engine: Engine) -> None:
    prompt = engine.encode_prompt("The quick brown fox")
    full = engine.generate([EngineRequest("f", prompt, SamplingParams(max_tokens=20, temperature=0))])["f"]
    head_ids = full[0][:7]
    head_text = engine.decode(head_ids)
    params = SamplingParams(max_tokens=20, temperature=0)
    rest = engine.generate([EngineRequest("g", prompt, params, head_ids, head_text)])["g"]
    assert head_ids + rest[0] == full[0]
    assert head_text + rest[1] == full[1]


def _byte_tokens() -> tuple[list[int], Any]:
    data = "aé日🚀b".encode()
    return list(data), lambda ids: bytes(ids).decode("utf-8", "replace")


def test_detokenizer_never_emits_a_broken_character() -> None:
    ids, decode = _byte_tokens()
    detok = IncrementalDetokenizer(decode)
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) == "aé日🚀b"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["a", "", "é"]


def test_detokenizer_resumes_after_a_partial_character() -> None:
    ids, decode = _byte_tokens()
    # The earlier run sent "aé" and the first byte of 日 (no text for it yet).
    detok = IncrementalDetokenizer(decode, ids[:4], "aé")
    rest = "".join(detok.push([i]) for i in ids[4:]) + detok.flush()
    assert rest == "日🚀b"


def test_stop_strings_are_cut_and_prefixes_held_back() -> None:
    stops = StopMatcher(("END", "\n\n"))
    assert stops.feed("hello E") == ("hello ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("X more") == ("ENX more", False)
    assert stops.feed(" then\n") == (" then", False)
    assert stops.feed("\nrest") == ("", True)
    assert StopMatcher(("END",)).feed("abcENDdef") == ("abc", True)
    held = StopMatcher(("END",))
    assert held.feed("xE") == ("x", False) and held.flush() == "E"


def test_engine_stop_string_not_emitted(engine: Engine) -> None:
    prompt = engine.encode_prompt("Hello")
    _, text, _ = engine.generate([EngineRequest("s", prompt, SamplingParams(max_tokens=30, temperature=0))])["s"]
    stop = text[5:8]
    assert len(stop) == 3 and "\ufffd" not in stop, f"the tiny model's greedy text {text!r} has no stop string"
    params = SamplingParams(max_tokens=30, temperature=0, stop=(stop,))
    _, cut, reason = engine.generate([EngineRequest("t", prompt, params)])["t"]
    assert reason == "stop"
    assert cut == text[: text.index(stop)]


def test_tiny_model_dir_loads(tmp_path: Path) -> None:
    assert (build_tiny_model(tmp_path) / "tokenizer.json").is_file()


def test_kv_budget_makes_requests_wait_not_fail(tiny_model_dir: Path, reference: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    probe = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), torch.device("cpu"), 8, kv_cache_bytes=1 << 20)
    per_token = probe.runner.bytes_per_token
    # Room for 300 tokens: requests reserving ~100 (prompt + max_tokens) run three at a time.
    engine = Engine(model, probe.tokenizer, torch.device("cpu"), 8, kv_cache_bytes=300 * per_token)
    prompts = [engine.encode_prompt(f"Kafka {i}") for i in range(6)]
    requests = [
        EngineRequest(f"k{i}", p, SamplingParams(max_tokens=100 - len(p), temperature=0)) for i, p in enumerate(prompts)
    ]
    for request in requests:
        engine.add(request)
    results: dict[str, list[int]] = {}
    most = 0
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
        most = max(most, engine.num_running)
        assert engine.runner.cache.rows * (engine.runner.cache.width - 1) <= 300
    assert most == 3
    for request in requests:
        want = _greedy_reference(engine, reference, request.prompt_ids, request.params.max_tokens)
        assert results[request.request_id] == want


def test_long_prompt_prefills_in_chunks_while_running_rows_keep_streaming(tiny_model_dir: Path, reference: Any) -> None:
    engine = Engine.load(str(tiny_model_dir), device="cpu", max_batch_size=4, prefill_chunk_tokens=16)
    engine.eos_ids = frozenset()  # fixed-length streams
    short = EngineRequest("short", engine.encode_prompt("Hello"), SamplingParams(max_tokens=40, temperature=0))
    engine.add(short)
    engine.step()
    long_prompt = engine.encode_prompt("The quick brown fox jumps over the lazy dog. " * 6)
    assert len(long_prompt) > 3 * 16
    engine.add(EngineRequest("long", long_prompt, SamplingParams(max_tokens=5, temperature=0)))
    prefilled: list[int] = []
    seen_long = False
    while not seen_long:
        before = engine.runner.length("long") if "long" in engine.runner.row_ids else 0
        outputs = {o.request_id: o for o in engine.step()}
        # The running stream gets its token in every step the long prompt is being prefilled.
        assert len(outputs["short"].token_ids) == 1
        prefilled.append(engine.runner.length("long") - before)
        seen_long = "long" in outputs
    assert max(prefilled) <= 16 and sum(prefilled) == len(long_prompt)
    results = {"long": list(outputs["long"].token_ids)}
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
    ids = list(long_prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    assert results["long"] == ids[len(long_prompt) :]


def test_a_prompt_past_the_context_is_refused_not_run(engine: Engine) -> None:
    from schemas.errors import EngineError

    with pytest.raises(EngineError, match="does not fit a context of 256"):
        engine.add(EngineRequest("big", [5] * 256, SamplingParams(max_tokens=1)))
    assert not engine.has_work()

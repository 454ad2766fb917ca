"""The sampler's math on hand-made logits, and the engine's n choices (one prefill) and logprobs on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from schemas.errors import EngineRefused
from schemas.sampling import SamplingParams
from workers import metrics
from workers.engine.engine import Engine
from workers.engine.sampling import RowSampler, sample, sample_rows
from workers.engine.types import EngineRequest, StepOutput

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def _row(**kw: object) -> RowSampler:
    return RowSampler(SamplingParams(**{"max_tokens": 4, "temperature": 0.0, **kw}))  # type: ignore[arg-type]


def test_logit_bias_moves_the_greedy_choice_per_row() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [_row(logit_bias={"0": 5.0}), _row(logit_bias={"2": -100.0})]
    assert sample(logits, rows) == [0, 1]


def test_frequency_and_presence_penalties_follow_openai() -> None:
    # Token 2 was generated twice: logit 3.0 - 2 * 0.6 (frequency) - 0.5 (presence) = 1.3 < 2.0.
    row = RowSampler(SamplingParams(4, 0.0, frequency_penalty=0.6, presence_penalty=0.5), generated=[2, 2])
    assert sample(torch.tensor([[1.0, 2.0, 3.0]]), [row]) == [1]
    # Once: 3.0 - 0.6 - 0.5 = 1.9 < 2.0 as well; with presence alone 2.5 > 2.0 it stays.
    assert sample(torch.tensor([[1.0, 2.0, 3.0]]), [_row(frequency_penalty=0.6, presence_penalty=0.5)]) == [2]
    once = RowSampler(SamplingParams(4, 0.0, presence_penalty=0.5), generated=[2])
    assert sample(torch.tensor([[1.0, 2.0, 3.0]]), [once]) == [2]
    # The prompt does not count for OpenAI's penalties.
    prompt_only = RowSampler(SamplingParams(4, 0.0, presence_penalty=2.0), prompt_ids=[2])
    assert sample(torch.tensor([[1.0, 2.0, 3.0]]), [prompt_only]) == [2]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output() -> None:
    # Seen (prompt): token 2 (3.0 / 2 = 1.5) and token 0 (-1.0 * 2 = -2.0); unseen token 1 keeps 2.0.
    row = RowSampler(SamplingParams(4, 0.0, repetition_penalty=2.0, logprobs=True), prompt_ids=[0, 2])
    picked = sample_rows(torch.tensor([[-1.0, 2.0, 3.0]]), [row])[0]
    assert picked.token == 1
    expected = torch.tensor([-2.0, 2.0, 1.5]).log_softmax(-1)
    assert picked.logprob is not None and math.isclose(picked.logprob.logprob, float(expected[1]), rel_tol=1e-6)


def test_penalties_count_what_the_row_generates() -> None:
    row = _row(frequency_penalty=2.0)
    logits = torch.tensor([[0.0, 2.5, 3.0]])
    # 3.0 first; then 3.0 - 2.0 = 1.0 < 2.5; then 2.5 - 2.0 = 0.5 < 1.0: the penalty forbids repeating.
    assert [sample(logits, [row])[0] for _ in range(3)] == [2, 1, 2]


def test_min_p_keeps_only_tokens_near_the_most_likely() -> None:
    # Probabilities ~ [0.665, 0.245, 0.090]: min_p 0.3 keeps 0 and 1 (0.245 / 0.665 = 0.37), drops 2 (0.135).
    logits = torch.tensor([[2.0, 1.0, 0.0]]).log_softmax(-1)
    rows = [RowSampler(SamplingParams(4, 1.0, min_p=0.3, seed=s)) for s in range(200)]
    picks = sample(logits.repeat(200, 1), rows)
    assert set(picks) == {0, 1}
    assert 2 in sample(logits.repeat(200, 1), [RowSampler(SamplingParams(4, 1.0, seed=s)) for s in range(200)])


def test_logprobs_of_a_greedy_row_rank_its_token_first() -> None:
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0]])
    picked = sample_rows(logits, [_row(logprobs=True, top_logprobs=3)])[0]
    lp = logits.log_softmax(-1)[0]
    assert picked.token == 1 and picked.logprob is not None
    assert picked.logprob.token_id == 1 and math.isclose(picked.logprob.logprob, float(lp[1]), rel_tol=1e-6)
    assert [t.token_id for t in picked.logprob.top] == [1, 2, 0]
    assert [round(t.logprob, 5) for t in picked.logprob.top] == [round(float(lp[i]), 5) for i in (1, 2, 0)]
    assert sample_rows(logits, [_row()])[0].logprob is None


def test_logprobs_of_a_sampled_row_are_of_the_tempered_distribution() -> None:
    logits = torch.tensor([[0.5, 3.0, 1.0]])
    picked = sample_rows(logits, [RowSampler(SamplingParams(4, 0.5, seed=3, logprobs=True))])[0]
    expected = (logits / 0.5).log_softmax(-1)[0]
    assert picked.logprob is not None and picked.logprob.top == ()
    assert math.isclose(picked.logprob.logprob, float(expected[picked.token]), rel_tol=1e-6)


def test_choices_of_a_seeded_request_draw_apart_and_reproducibly() -> None:
    logits = torch.zeros((1, 50))
    params = SamplingParams(4, 1.0, seed=7, n=3)
    first = [sample(logits, [RowSampler(params, index=i)])[0] for i in range(3)]
    again = [sample(logits, [RowSampler(params, index=i)])[0] for i in range(3)]
    assert first == again and len(set(first)) > 1


def _run(engine: Engine, request: EngineRequest) -> list[StepOutput]:
    engine.add(request)
    outputs: list[StepOutput] = []
    while engine.has_work():
        outputs.extend(engine.step())
    return outputs


def test_n_choices_share_one_prefill_and_end_together(engine: Engine) -> None:
    prompt = engine.encode_prompt("The quick brown fox jumps over the lazy dog")
    before = metrics.PREFILL_TOKENS._value.get()
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=3, logprobs=True, top_logprobs=2)
    outputs = _run(engine, EngineRequest("n3", prompt, params))
    assert metrics.PREFILL_TOKENS._value.get() - before == len(prompt)  # one prefill for three choices
    ends = [o for o in outputs if o.finish_reason is not None]
    assert len(ends) == 1 and ends[0] is outputs[-1] and len(ends[0].choice_finish_reasons) == 3
    by_choice = {i: [t for o in outputs if o.index == i for t in o.token_ids] for i in range(3)}
    assert all(by_choice.values())
    alone = engine.generate([EngineRequest("solo", prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=11))])
    assert by_choice[0] == alone["solo"][0]  # choice 0 is what the request alone would draw
    for out in outputs:
        assert len(out.logprobs) == len(out.token_ids)
        assert all(len(lp.top) == 2 and lp.token_id == t for lp, t in zip(out.logprobs, out.token_ids, strict=True))


def test_greedy_choices_are_equal_and_their_tokens_top_their_logprobs(engine: Engine) -> None:
    prompt = engine.encode_prompt("Kafka is a distributed log")
    params = SamplingParams(max_tokens=5, temperature=0.0, n=2, logprobs=True, top_logprobs=3)
    engine.eos_ids, eos = frozenset(), engine.eos_ids
    try:
        outputs = _run(engine, EngineRequest("g2", prompt, params))
    finally:
        engine.eos_ids = eos
    first = [t for o in outputs if o.index == 0 for t in o.token_ids]
    assert first == [t for o in outputs if o.index == 1 for t in o.token_ids] and len(first) == 5
    for out in outputs:
        for lp in out.logprobs:
            assert lp.top[0].token_id == lp.token_id and lp.top[0].logprob == pytest.approx(lp.logprob)


def test_abort_ends_every_choice_once(engine: Engine) -> None:
    engine.add(EngineRequest("ab", engine.encode_prompt("Hello"), SamplingParams(max_tokens=50, temperature=0, n=2)))
    engine.step()
    engine.abort("ab")
    out = engine.step()
    assert [o.finish_reason for o in out] == [None, "aborted"] and not engine.has_work()
    assert out[-1].choice_finish_reasons == ("aborted", "aborted")


def test_the_engine_refuses_what_it_cannot_do(engine: Engine) -> None:
    prompt = engine.encode_prompt("Hello")
    schema = '{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"nonsense"},"strict":false}}'
    with pytest.raises(EngineRefused, match="cannot be compiled"):  # a schema its grammar cannot take
        engine.prepare(SamplingParams(4, response_format=schema))
    with pytest.raises(EngineRefused, match="vocabulary"):
        engine.add(EngineRequest("lb", prompt, SamplingParams(4, logit_bias={"10000000": 1.0})))
    assert not engine.has_work()

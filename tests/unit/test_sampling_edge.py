"""Bodies to SamplingParams: each API's one call, JSON types at the edge, ranges only from SamplingParams.check."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.api.responses_body import parse_create
from gateway.api.validation import SAMPLING_TYPES, parse_sampling
from schemas.errors import FieldError
from schemas.sampling import MAX_STOP, MAX_STOP_CHARS, SamplingParams

LIMIT = 100

# Out of range: (field, its JSON value, the same as a record holds it); check() refuses each.
OUT_OF_RANGE: list[tuple[str, Any, Any]] = [
    ("max_tokens", 0, 0),
    ("max_tokens", LIMIT + 1, LIMIT + 1),
    ("max_tokens", 10**400, 10**400),
    ("temperature", -0.1, -0.1),
    ("temperature", 2.5, 2.5),
    ("temperature", 10**400, float("inf")),
    ("top_p", 0, 0.0),
    ("top_p", 1.5, 1.5),
    ("top_k", -1, -1),
    ("top_k", 10**7, 10**7),
    ("seed", 1 << 63, 1 << 63),
    ("stop", [""], ("",)),
    ("stop", ["x"] * (MAX_STOP + 1), ("x",) * (MAX_STOP + 1)),
    ("stop", "y" * (MAX_STOP_CHARS + 1), ("y" * (MAX_STOP_CHARS + 1),)),
]


def test_every_field_has_a_json_type() -> None:
    assert set(SAMPLING_TYPES) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_an_empty_body_gets_the_defaults() -> None:
    assert parse_sampling({}, LIMIT) == SamplingParams(max_tokens=16)
    assert parse_sampling({"top_p": None, "seed": None}, LIMIT, default_max_tokens=20) == SamplingParams(20)


@pytest.mark.parametrize(("name", "value", "typed"), OUT_OF_RANGE)
def test_the_edge_refuses_what_check_refuses(name: str, value: Any, typed: Any) -> None:
    with pytest.raises(FieldError) as edge:
        parse_sampling({name: value}, LIMIT)
    with pytest.raises(FieldError) as record:
        SamplingParams(**{"max_tokens": 16, name: typed}).check(LIMIT)
    assert edge.value.field == name and str(edge.value) == str(record.value)


@pytest.mark.parametrize(
    ("name", "value"), [("max_tokens", "5"), ("max_tokens", True), ("temperature", "hot"), ("stop", 3), ("seed", 1.5)]
)
def test_wrong_json_types_are_named(name: str, value: Any) -> None:
    with pytest.raises(FieldError) as info:
        parse_sampling({name: value}, LIMIT)
    assert info.value.field == name


def test_top_p_zero_is_refused_not_turned_into_one() -> None:
    with pytest.raises(FieldError, match=r"top_p: must be greater than 0\.0"):
        parse_sampling({"top_p": 0}, LIMIT)
    with pytest.raises(FieldError, match="top_p"):
        parse_create({"input": "hi", "top_p": 0}, LIMIT)


def test_the_responses_api_names_its_own_fields() -> None:
    spec = parse_create({"input": "hi", "max_output_tokens": 7, "temperature": 0, "top_p": 0.5}, LIMIT)
    assert spec.sampling == SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5)
    assert parse_create({"input": "hi"}, LIMIT).sampling.max_tokens == LIMIT
    with pytest.raises(FieldError) as info:
        parse_create({"input": "hi", "max_output_tokens": LIMIT + 1}, LIMIT)
    assert info.value.field == "max_output_tokens" and str(info.value).startswith("max_output_tokens: ")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("presence_penalty", 2.5, "presence_penalty: must be between -2.0 and 2.0"),
        ("frequency_penalty", -3.0, "frequency_penalty: must be between -2.0 and 2.0"),
        ("frequency_penalty", float("nan"), "frequency_penalty: must be between"),
        ("repetition_penalty", 0.0, "repetition_penalty: must be greater than 0.0"),
        ("min_p", 1.5, "min_p: must be between 0.0 and 1.0"),
        ("logit_bias", {"x": 1.0}, "logit_bias: keys must be token ids"),
        ("logit_bias", {"-1": 1.0}, "logit_bias: keys must be token ids"),
        ("logit_bias", {"5": 101.0}, "logit_bias: biases must be between -100 and 100"),
        ("logit_bias", {str(i): 1.0 for i in range(301)}, "logit_bias: at most 300 tokens"),
        ("n", 0, "n: must be between 1 and 16"),
        ("n", 17, "n: must be between 1 and 16"),
        ("top_logprobs", 21, "top_logprobs: must be between 0 and 20"),
        ("top_logprobs", 2, "top_logprobs: needs logprobs set to true"),
    ],
)
def test_check_refuses_the_openai_sampling_options_out_of_range(field: str, value: Any, message: str) -> None:
    with pytest.raises(FieldError) as info:
        SamplingParams(**{"max_tokens": 4, field: value}).check(LIMIT)
    assert info.value.field == field and str(info.value).startswith(message)


def test_check_keeps_the_openai_sampling_options_in_range() -> None:
    params = SamplingParams(
        4,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=1.3,
        min_p=0.1,
        logit_bias={"0": -100.0, "42": 100},
        n=16,
        logprobs=True,
        top_logprobs=20,
    ).check(LIMIT)
    assert params.penalized and params.bias() == {0: -100.0, 42: 100}
    assert not SamplingParams(4).penalized

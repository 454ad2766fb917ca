"""The OpenAI fold and its completions shapes, without a server: streamed and whole answers tell the same story."""

from __future__ import annotations

import json
from typing import Any

from gateway.api.openai import AnswerFold, Completed, Completions, Failed, Rewritten, TextDelta
from schemas.records import Delta, Finished, Started, TokenEvent, TokenLogprob, TopLogprob, Usage
from schemas.records import Failed as FailedRecord
from schemas.view import EventName, replay

RID = "01890000-0000-7000-8000-000000000000"


def log(*payloads: tuple[str, int, object]) -> list[tuple[int, TokenEvent]]:
    return [(i, TokenEvent(RID, run, seq, 1000 + i, p)) for i, (run, seq, p) in enumerate(payloads)]  # type: ignore[arg-type]


def fold_all(events: list[tuple[int, TokenEvent]]) -> tuple[AnswerFold, list[object]]:
    fold = AnswerFold("requested")
    steps = [fold.feed(ev.event, ev.data) for ev in replay(RID, events)]
    return fold, [s for s in steps if s is not None]


def test_fold_text_then_one_completion() -> None:
    fold, steps = fold_all(
        log(
            ("r1", 0, Started("w", "worker-model", 3, 1)),
            ("r1", 1, Delta("Hel", (1,))),
            ("r1", 2, Delta("lo", (2,))),
            ("r1", 3, Finished("length", Usage(3, 2))),
        )
    )
    assert steps == [
        TextDelta("Hel"),
        TextDelta("lo"),
        Completed("length", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
    ]
    assert fold.model == "worker-model" and fold.text == "Hello"


def test_fold_restart_extends_or_rewrites() -> None:
    kept = log(
        ("r1", 0, Started("w", "m", 3, 1)),
        ("r1", 1, Delta("ab", (1,))),
        ("r2", 0, Started("w", "m", 3, 1, "", None, 2, "abc")),
    )
    assert fold_all(kept)[1][-1] == TextDelta("c")
    fold, steps = fold_all(
        log(
            ("r1", 0, Started("w", "m", 3, 1)),
            ("r1", 1, Delta("ab", (1,))),
            ("r2", 0, Started("w", "m", 3, 1, "", None, 1, "x")),
        )
    )
    assert steps[-1] == Rewritten("x") and fold.text == "x"


def test_fold_error_and_stop_reason() -> None:
    _, steps = fold_all(log(("r1", 0, Started("w", "m", 3, 1)), ("r1", 1, FailedRecord("boom", "it broke", False))))
    assert steps == [Failed("boom", "it broke")]
    _, steps = fold_all(log(("r1", 0, Started("w", "m", 3, 1)), ("r1", 1, Finished("cancelled", Usage(3, 0)))))
    assert isinstance(steps[-1], Completed) and steps[-1].finish_reason == "stop"


def frames(data: bytes) -> list[Any]:
    return [json.loads(x[6:]) if x != b"data: [DONE]" else "[DONE]" for x in data.split(b"\n\n") if x]


def test_stream_and_whole_say_the_same() -> None:
    for chat in (False, True):
        fold = AnswerFold("m")
        surface = Completions(fold, RID, chat, include_usage=True)
        opening = frames(surface.opening())  # chat: the role chunk, sent before the worker names its model
        streamed: list[Any] = []
        end = None
        script: list[tuple[EventName, dict[str, Any]]] = [
            (EventName.STARTED, {"model": "worker-model"}),
            (EventName.TOKEN, {"text": "Hi"}),
            (EventName.TOKEN, {"text": "!"}),
            (EventName.DONE, {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
        ]
        for name, data in script:
            step = fold.feed(name, data)
            if isinstance(step, TextDelta):
                streamed += frames(surface.delta(step))
            elif isinstance(step, Completed):
                end = step
                streamed += frames(surface.completed(step))
        assert end is not None
        whole = surface.whole(end)
        text = "".join(
            (c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
            for c in streamed
            if isinstance(c, dict) and c["choices"]
        )
        assert text == (whole["choices"][0]["message"]["content"] if chat else whole["choices"][0]["text"]) == "Hi!"
        assert streamed[-1] == "[DONE]" and streamed[-2]["usage"] == whole["usage"]
        assert {c["model"] for c in streamed if isinstance(c, dict)} == {whole["model"]} == {"worker-model"}
        assert {c["id"] for c in opening + streamed if isinstance(c, dict)} == {whole["id"]}
        assert whole["id"] == ("chatcmpl-" if chat else "cmpl-") + RID
        assert whole["object"] == ("chat.completion" if chat else "text_completion")


def test_stream_failure_is_in_band_then_done() -> None:
    surface = Completions(AnswerFold("m"), RID, chat=True)
    assert frames(surface.failed("too_slow", "x")) == [
        {"error": {"code": "too_slow", "message": "x", "type": "server_error"}},
        "[DONE]",
    ]


def _lp(token: int, text: str, logprob: float) -> TokenLogprob:
    return TokenLogprob(
        token, logprob, (TopLogprob(token, logprob, text.encode()), TopLogprob(9, -5.0, b"\xe6")), text.encode()
    )


CHOICES = log(
    ("r1", 0, Started("w", "m", 3, 1)),
    ("r1", 1, Delta("He", (1,), 0, (_lp(1, "He", -0.5),))),
    ("r1", 2, Delta("Yo", (2,), 1, (_lp(2, "Yo", -0.25),))),
    ("r1", 3, Delta("y", (3,), 0, (_lp(3, "y", -1.0),))),
    ("r1", 4, Finished("stop", Usage(3, 3), choice_finish_reasons=("length", "stop"))),
)


def test_choices_and_logprobs_whole_in_the_chat_and_completions_shapes() -> None:
    for chat in (True, False):
        fold = AnswerFold("m")
        surface = Completions(fold, RID, chat, n=2, logprobs=True)
        end = None
        for ev in replay(RID, CHOICES):
            step = fold.feed(ev.event, ev.data)
            end = step if isinstance(step, Completed) else end
        assert end is not None
        body = surface.whole(end)
        assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
        first = body["choices"][0]
        if chat:
            assert [c["message"]["content"] for c in body["choices"]] == ["Hey", "Yo"]
            content = first["logprobs"]["content"]
            assert [(e["token"], e["logprob"], e["bytes"]) for e in content] == [
                ("He", -0.5, [72, 101]),
                ("y", -1.0, [121]),
            ]
            assert content[0]["top_logprobs"][1] == {"token": "bytes:\\xe6", "logprob": -5.0, "bytes": [230]}
        else:
            assert [c["text"] for c in body["choices"]] == ["Hey", "Yo"]
            assert first["logprobs"] == {
                "tokens": ["He", "y"],
                "token_logprobs": [-0.5, -1.0],
                "top_logprobs": [{"He": -0.5, "bytes:\\xe6": -5.0}, {"y": -1.0, "bytes:\\xe6": -5.0}],
                "text_offset": [0, 2],
            }


def test_choices_stream_with_their_index_and_each_ends_once() -> None:
    fold = AnswerFold("m")
    surface = Completions(fold, RID, True, n=2, logprobs=True)
    chunks = frames(surface.opening())
    for ev in replay(RID, CHOICES):
        step = fold.feed(ev.event, ev.data)
        if isinstance(step, TextDelta):
            chunks += frames(surface.delta(step))
        elif isinstance(step, Completed):
            chunks += frames(surface.completed(step))
    choices = [c["choices"][0] for c in chunks if isinstance(c, dict) and c.get("choices")]
    assert [c["delta"].get("role") for c in choices[:2]] == ["assistant", "assistant"]
    texts = {i: "".join(c["delta"].get("content") or "" for c in choices if c["index"] == i) for i in (0, 1)}
    assert texts == {0: "Hey", 1: "Yo"}
    assert [(c["index"], c["finish_reason"]) for c in choices if c["finish_reason"]] == [(0, "length"), (1, "stop")]
    streamed = [e["token"] for c in choices if c["logprobs"] for e in c["logprobs"]["content"]]
    assert streamed == ["He", "Yo", "y"]

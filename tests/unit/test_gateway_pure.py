"""Unit tests of the gateway's pure parts: cursor, SSE framing, view, validation, auth."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.api.auth import CANCEL, SECRET_FILE, WATCH, Auth, key_id
from gateway.api.validation import BodyError, FieldError, parse_json_object, parse_sampling, parse_stream_flags
from gateway.fanout.cursor import Cursor, decode_cursor, encode_cursor, event_epoch
from gateway.fanout.sse import KEEPALIVE, PREAMBLE, frame, parse
from schemas.errors import CursorError
from schemas.records import Delta, Failed, Finished, Started, TokenEvent, Usage
from schemas.view import View, replay
from services.settings import Settings

RID = "01890000-0000-7000-8000-000000000000"


@pytest.mark.parametrize("cursor", [Cursor(0, 0, 0), Cursor(65535, 7, 123456789), Cursor(1, 2**31 - 1, 2**63 - 1)])
def test_cursor_round_trip(cursor: Cursor) -> None:
    text = encode_cursor(cursor)
    assert len(text) <= 24 and text.replace("-", "").replace("_", "").isalnum()
    assert decode_cursor(text) == cursor


@pytest.mark.parametrize("bad", ["", "!!!!", "a" * 100, "AQ", "AQAAAA=", "AgAAAAA", "AQAAAICA", "AQAAAAAA", " AQAAAAA"])
def test_cursor_strict(bad: str) -> None:
    with pytest.raises(CursorError):
        decode_cursor(bad)


def test_cursor_epoch_is_event_bound() -> None:
    assert event_epoch(RID, "r1", 3) == event_epoch(RID, "r1", 3)
    assert len({event_epoch(RID, "r1", s) for s in range(50)}) > 40


def test_sse_frame_multiline_and_keepalive_comment() -> None:
    data = frame("token", "a\nb\r\nc", "X1")
    assert data == b"id: X1\nevent: token\ndata: a\ndata: b\ndata: c\n\n"
    assert parse(data.decode()) == [{"id": "X1", "event": "token", "data": "a\nb\nc"}]
    assert PREAMBLE == b"retry: 1000\n\n" and KEEPALIVE == b": keepalive\n\n"
    # A keepalive is a comment line: a reader sees no event in it, and the events around it unchanged.
    assert parse(KEEPALIVE.decode()) == []
    assert parse((KEEPALIVE + data + KEEPALIVE).decode()) == parse(data.decode())
    with pytest.raises(ValueError):
        frame("to\nken", "x")


def ev(run: str, seq: int, payload: object) -> TokenEvent:
    return TokenEvent(RID, run, seq, 1000 + seq, payload)  # type: ignore[arg-type]


def started(run: str, cont: str | None = None, tokens: int = 0, text: str = "") -> TokenEvent:
    return ev(run, 0, Started("w", "m", 3, 1, "", cont, tokens, text))


def delta(run: str, seq: int, text: str) -> TokenEvent:
    return ev(run, seq, Delta(text, (seq,)))


def done(run: str, seq: int, n: int) -> TokenEvent:
    return ev(run, seq, Finished("length", Usage(3, n)))


def names(log: list[TokenEvent]) -> list[tuple[str, str]]:
    return [(o.event, json.dumps(o.data)) for o in replay(RID, list(enumerate(log)))]


def test_view_simple_stream() -> None:
    out = replay(RID, list(enumerate([started("a"), delta("a", 1, "x"), delta("a", 2, "y"), done("a", 3, 2)])))
    assert [o.event for o in out] == ["started", "token", "token", "done"]
    assert [o.offset for o in out] == [0, 1, 2, 3]
    assert out[-1].data == {"finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def test_view_duplicates_and_after_terminal_ignored() -> None:
    log = [started("a"), delta("a", 1, "x"), delta("a", 1, "x"), done("a", 2, 1), delta("a", 3, "z"), done("a", 4, 1)]
    assert [e for e, _ in names(log)] == ["started", "token", "done"]


def test_view_run_fencing_and_restart() -> None:
    log = [
        started("a"),
        delta("a", 1, "x"),
        started("b", cont=None),  # a new run from scratch
        delta("a", 2, "late"),  # old run, fenced
        delta("b", 1, "p"),
        ev("b", 2, Failed("boom", "m")),
    ]
    out = replay(RID, list(enumerate(log)))
    assert [o.event for o in out] == ["started", "token", "restart", "token", "error"]
    assert out[2].data == {"run_id": "b", "text": ""}
    assert out[3].data["text"] == "p"


def test_view_seamless_continuation() -> None:
    log = [started("a"), delta("a", 1, "x"), delta("a", 2, "y"), started("b", "a", 2, "xy"), delta("b", 1, "z")]
    view = View(RID)
    out = [o for i, e in enumerate(log) if (o := view.feed(i, e)) is not None]
    assert [o.event for o in out] == ["started", "token", "token", "token"]
    assert view.text == "xyz" and view.run_id == "b"


def test_view_continuation_with_wrong_count_is_restart() -> None:
    log = [started("a"), delta("a", 1, "x"), delta("a", 2, "y"), started("b", "a", 1, "x"), delta("b", 1, "q")]
    out = replay(RID, list(enumerate(log)))
    assert [o.event for o in out] == ["started", "token", "token", "restart", "token"]
    assert out[3].data == {"run_id": "b", "text": "x"}


def test_view_is_deterministic_prefix() -> None:
    log = [started("a"), delta("a", 1, "x"), started("b", "a", 1, "x"), delta("b", 1, "y"), done("b", 2, 2)]
    full = replay(RID, list(enumerate(log)))
    for k in range(len(log)):
        assert replay(RID, list(enumerate(log[:k]))) == [o for o in full if o.offset < k]


def test_validation() -> None:
    with pytest.raises(BodyError):
        parse_json_object(b"\xff\xfe")
    with pytest.raises(BodyError):
        parse_json_object(b"[1]")
    with pytest.raises(BodyError):
        parse_json_object(b'{"a": NaN}')
    with pytest.raises(FieldError) as info:
        parse_sampling({"max_tokens": "5"}, 100)
    assert info.value.field == "max_tokens"
    with pytest.raises(FieldError):
        parse_sampling({"max_tokens": 10**400}, 100)
    with pytest.raises(FieldError):
        parse_sampling({"temperature": 10**400}, 100)
    with pytest.raises(FieldError):
        parse_sampling({"max_tokens": True}, 100)
    s = parse_sampling({"max_tokens": 5, "stop": "x", "seed": 3}, 100)
    assert s.max_tokens == 5 and s.stop == ("x",) and s.seed == 3
    with pytest.raises(BodyError):
        parse_stream_flags({"stream_options": {"include_usage": True}})
    assert parse_stream_flags({"stream": True, "stream_options": {"include_usage": True}}) == (True, True)


def test_auth_tokens_and_keys(tmp_path: Path) -> None:
    settings = Settings(api_keys=("sekret",), stream_token_ttl_s=60, cache_dir=tmp_path)
    auth = Auth(settings)
    tenant = key_id("sekret")
    assert auth.tenant_of("Bearer sekret") == tenant and "sekret" not in tenant
    assert auth.tenant_of("Bearer nope") is None and auth.tenant_of(None) is None
    token = auth.sign(RID, tenant, now=1000)
    assert auth.verify(RID, token, now=1000)
    assert not auth.verify(RID, token, now=1061)
    assert not auth.verify(RID.replace("0000-7", "0001-7"), token, now=1000)
    assert not auth.verify(RID, token[:-2] + "AA", now=1000)


def test_stream_tokens_watch_only_unless_minted_for_cancel(tmp_path: Path) -> None:
    auth = Auth(Settings(api_keys=("sekret",), cache_dir=tmp_path))
    watch = auth.sign(RID, key_id("sekret"))
    cancel = auth.sign(RID, key_id("sekret"), WATCH | CANCEL)
    assert auth.verify(RID, watch) and not auth.verify(RID, watch, CANCEL)
    assert auth.verify(RID, cancel) and auth.verify(RID, cancel, CANCEL)
    assert auth.scope_of(RID, watch) == WATCH and auth.scope_of(RID, "x" * 43) == 0


def test_stream_tokens_survive_key_rotation_and_die_with_their_key(tmp_path: Path) -> None:
    before = Auth(Settings(api_keys=("key-a", "key-b"), cache_dir=tmp_path))
    of_a, of_b = before.sign(RID, key_id("key-a")), before.sign(RID, key_id("key-b"))
    added = Auth(Settings(api_keys=("key-c", "key-b", "key-a"), cache_dir=tmp_path))  # another gateway, same dir
    assert added.verify(RID, of_a) and added.verify(RID, of_b)
    revoked = Auth(Settings(api_keys=("key-b", "key-c"), cache_dir=tmp_path))
    assert not revoked.verify(RID, of_a) and revoked.verify(RID, of_b)
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    # An explicit secret is what gateways on several machines share; a token of another secret is refused.
    shared = Settings(api_keys=("key-a",), stream_token_secret="s3cret", cache_dir=tmp_path / "one")
    elsewhere = Auth(replace(shared, cache_dir=tmp_path / "two"))
    assert elsewhere.verify(RID, Auth(shared).sign(RID, key_id("key-a")))
    assert not elsewhere.verify(RID, of_a)

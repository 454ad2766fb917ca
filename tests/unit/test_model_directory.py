"""The gateway's directory of live models, from announcements alone."""

from __future__ import annotations

from schemas.models import ModelDirectory
from schemas.records import ModelInfo


def _info(name: str, worker: str, ts: int, **kw: object) -> ModelInfo:
    fields: dict[str, object] = {"context_length": 2048, "has_chat_template": True, "ttl_ms": 1000}
    fields.update(kw)
    return ModelInfo(name=name, worker=worker, ts_ms=ts, **fields)  # type: ignore[arg-type]


def test_a_model_lives_while_a_worker_of_it_heartbeats() -> None:
    d = ModelDirectory()
    d.feed(_info("a", "w1", 1000), 1000)
    assert list(d.live(1500)) == ["a"]
    assert d.live(2500) == {}  # its ttl passed
    d.feed(_info("a", "w1", 2400), 2400)
    assert list(d.live(2500)) == ["a"]


def test_workers_of_one_model_promise_only_what_all_accept() -> None:
    d = ModelDirectory()
    d.feed(_info("a", "w1", 1000, context_length=4096, max_tokens_limit=512), 1000)
    d.feed(_info("a", "w2", 1000, context_length=2048, has_chat_template=False, max_tokens_limit=1024), 1000)
    model = d.get("a", 1100)
    assert model is not None
    assert (model.context_length, model.has_chat_template, model.max_tokens_limit, model.workers) == (
        2048,
        False,
        512,
        2,
    )


def test_a_withdrawn_worker_is_gone_at_once_and_old_records_do_not_revive_it() -> None:
    d = ModelDirectory()
    d.feed(_info("a", "w1", 1000), 1000)
    d.feed(_info("a", "w1", 1100, ttl_ms=0), 1100)
    assert d.live(1200) == {}
    d.feed(_info("a", "w1", 900), 900)  # an older heartbeat read late
    assert d.live(1200) == {}


def test_resolve_names_default_and_the_only_model() -> None:
    d = ModelDirectory()
    d.feed(_info("small", "w1", 1000), 1000)
    assert d.resolve(None, "default", 1100) is not None  # the only live model
    assert d.resolve("other", "default", 1100) is None
    d.feed(_info("default", "w2", 1000), 1000)
    resolved = d.resolve(None, "default", 1100)
    assert resolved is not None and resolved.name == "default"
    assert d.resolve("small", "default", 1100) is not None


def test_announcements_from_the_far_future_are_ignored() -> None:
    d = ModelDirectory()
    d.feed(_info("a", "w1", 1000), 1000)
    # A forged withdrawal stamped a year ahead would outrank every real heartbeat of the worker: it is not believed.
    assert not d.feed(_info("a", "w1", 1000 + 365 * 86_400_000, ttl_ms=0), 1000)
    assert list(d.live(1500)) == ["a"]
    assert not d.feed(_info("ghost", "w9", 1000 + 365 * 86_400_000, ttl_ms=10**9), 1000)
    assert list(d.live(1500)) == ["a"]
    d.feed(_info("a", "w1", 1900), 1000)  # a small skew ahead is a clock, not a forgery
    assert list(d.live(2500)) == ["a"]


def test_the_directory_is_bounded_and_unroutable_models_are_not_live() -> None:
    d = ModelDirectory(max_announcements=10)
    d.feed(_info("real", "w1", 5000), 5000)
    for i in range(100):
        d.feed(_info(f"fake{i}", "w", 4000 + i), 5000)
    assert len(d.live(5001)) <= 10 and "real" in d.live(5001)
    d.servable = lambda name: name == "real"
    assert list(d.live(5001)) == ["real"] and d.unavailable(5001) == []
    assert d.announced("fake99", 5001) and d.resolve("fake99", "default", 5001) is None

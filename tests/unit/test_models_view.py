"""The live models from the models topic's announcements (pure)."""

from __future__ import annotations

from schemas.records import ModelInfo
from services.models import live_models


def _info(name: str, ts_ms: int, ttl_ms: int = 15_000, chat: bool = True) -> ModelInfo:
    return ModelInfo(name, "w1", 2048, ts_ms, has_chat_template=chat, ttl_ms=ttl_ms)


def test_the_newest_announcement_wins_and_only_live_ones_count() -> None:
    infos = [_info("a", 0, chat=False), _info("a", 10_000), _info("b", 0), _info("c", 19_000, ttl_ms=0)]
    live = live_models(infos, now_ms=20_000)
    assert sorted(live) == ["a"]  # b's heartbeat ran out; c was withdrawn (ttl 0)
    assert live["a"].has_chat_template

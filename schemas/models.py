"""The models the workers announce, folded into what is live now: pure, fed from the models topic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from schemas.records import ModelInfo

FORGET_AFTER_MS = 3_600_000
# An announcement stamped further ahead than this is not believed: the models topic is compacted, so a forged
# far-future withdrawal (or heartbeat) would otherwise outrank every real one of its worker, even across restarts.
MAX_FUTURE_MS = 60_000
# (model, worker) pairs held at most: a flood of invented names cannot grow memory or `GET /v1/models` without bound.
MAX_ANNOUNCEMENTS = 4096


@dataclass(frozen=True, slots=True)
class LiveModel:
    """One served name as the gateway sees it: the limits every live worker of it accepts."""

    name: str
    context_length: int
    has_chat_template: bool
    max_tokens_limit: int
    workers: int
    engine: str
    device: str

    def as_openai(self) -> dict[str, object]:
        """The model object of `GET /v1/models`, with vLLM's `max_model_len` and tokenrelay's extras."""
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "tokenrelay",
            "max_model_len": self.context_length,
            "chat_template": self.has_chat_template,
            "max_tokens_limit": self.max_tokens_limit,
            "workers": self.workers,
            "engine": self.engine,
            "device": self.device,
        }


class ModelDirectory:
    """The latest announcement of each (model, worker); a worker silent past its ttl, or withdrawn, is gone."""

    def __init__(self, max_announcements: int = MAX_ANNOUNCEMENTS) -> None:
        self._latest: dict[tuple[str, str], ModelInfo] = {}
        self.max_announcements = max_announcements
        # Whether requests for a model name can be routed at all (the gateway: its requests topic exists).
        self.servable: Callable[[str], bool] = lambda name: True

    def feed(self, info: ModelInfo, now_ms: int) -> bool:
        """Take an announcement read at ``now_ms``; False when it is ignored (stamped too far in the future)."""
        if info.ts_ms > now_ms + MAX_FUTURE_MS:
            return False
        key = (info.name, info.worker)
        known = self._latest.get(key)
        if known is None or info.ts_ms >= known.ts_ms:
            self._latest[key] = info
            if len(self._latest) > self.max_announcements:
                # The stalest goes (a live worker heartbeats, so it is never the stalest for long).
                del self._latest[min(self._latest, key=lambda k: self._latest[k].ts_ms)]
        return True

    def live(self, now_ms: int) -> dict[str, LiveModel]:
        by_name: dict[str, list[ModelInfo]] = {}
        for key, info in list(self._latest.items()):
            if info.live(now_ms):
                if self.servable(info.name):
                    by_name.setdefault(info.name, []).append(info)
            elif now_ms > info.ts_ms + max(10 * info.ttl_ms, FORGET_AFTER_MS):
                del self._latest[key]  # long dead (a withdrawal is kept a while, so a late old heartbeat stays dead)
        return {name: _merge(name, infos) for name, infos in sorted(by_name.items())}

    def announced(self, name: str, now_ms: int) -> bool:
        """Whether a live worker announces ``name``, servable or not."""
        return any(info.name == name and info.live(now_ms) for info in self._latest.values())

    def unavailable(self, now_ms: int) -> list[str]:
        """Models announced recently whose workers all went silent without withdrawing (died): not servable now."""
        live = self.live(now_ms)
        recent = {info.name for info in self._latest.values() if info.ttl_ms > 0 and self.servable(info.name)}
        return sorted(recent - set(live))

    def get(self, name: str, now_ms: int) -> LiveModel | None:
        return self.live(now_ms).get(name)

    def resolve(self, requested: str | None, default: str, now_ms: int) -> LiveModel | None:
        """The model a request goes to: the one it names, else the default, else the only live one."""
        live = self.live(now_ms)
        if requested:
            return live.get(requested)
        if default in live:
            return live[default]
        return next(iter(live.values())) if len(live) == 1 else None


def _merge(name: str, infos: list[ModelInfo]) -> LiveModel:
    # Workers of one name should be alike; where they are not, only what all of them accept is promised.
    limits = [i.max_tokens_limit for i in infos if i.max_tokens_limit > 0]
    newest = max(infos, key=lambda i: i.ts_ms)
    return LiveModel(
        name=name,
        context_length=min(i.context_length for i in infos),
        has_chat_template=all(i.has_chat_template for i in infos),
        max_tokens_limit=min(limits) if limits else 0,
        workers=len(infos),
        engine=newest.engine,
        device=newest.device,
    )

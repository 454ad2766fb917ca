"""Which gateway reads which events partition: the sticky assignment, its wire form, and the partition -> URL map."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Member:
    """What a gateway tells the group when it joins: where it serves, and the partitions it reads now."""

    url: str
    owned: tuple[int, ...] = ()


def encode_member(member: Member) -> bytes:
    return json.dumps({"url": member.url, "owned": list(member.owned)}, separators=(",", ":")).encode()


def decode_member(data: bytes | None) -> Member:
    """A member's join data; an unreadable one (another version, another client) is a member with no URL."""
    try:
        raw = json.loads(data or b"{}")
        return Member(str(raw.get("url", "")), tuple(int(p) for p in raw.get("owned", ())))
    except (ValueError, TypeError, AttributeError):
        return Member("")


def encode_map(urls: Mapping[int, str]) -> bytes:
    return json.dumps({str(p): url for p, url in sorted(urls.items())}, separators=(",", ":")).encode()


def decode_map(data: bytes | None) -> dict[int, str]:
    try:
        raw = json.loads(data or b"{}")
        return {int(p): str(url) for p, url in raw.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def sticky_assign(partitions: Iterable[int], members: Mapping[str, Member]) -> dict[str, list[int]]:
    """Balanced (counts differ by at most one) and sticky: a member keeps what it reads now, up to its share.

    Deterministic for the same input, so every leader computes the same plan.
    """
    parts = sorted(set(partitions))
    ids = sorted(members)
    plan: dict[str, list[int]] = {mid: [] for mid in ids}
    if not ids:
        return plan
    valid = set(parts)
    base, extra = divmod(len(parts), len(ids))
    # The larger shares go to the members that already hold the most: fewer partitions move.
    by_holding = sorted(ids, key=lambda mid: (-len(valid.intersection(members[mid].owned)), mid))
    cap = {mid: base + (1 if i < extra else 0) for i, mid in enumerate(by_holding)}
    taken: set[int] = set()
    for mid in by_holding:
        for p in members[mid].owned:
            if len(plan[mid]) < cap[mid] and p in valid and p not in taken:
                plan[mid].append(p)
                taken.add(p)
    free = [p for p in parts if p not in taken]
    for mid in by_holding:
        while len(plan[mid]) < cap[mid]:
            plan[mid].append(free.pop(0))
    return {mid: sorted(ps) for mid, ps in plan.items()}


def owner_urls(plan: Mapping[str, Iterable[int]], members: Mapping[str, Member]) -> dict[int, str]:
    return {p: members[mid].url for mid, ps in plan.items() for p in ps}


class Owners:
    """The partition -> gateway URL map of the group's current generation, and a way to wait for the next one."""

    def __init__(self, me: str):
        self.me = me
        self.urls: dict[int, str] = {}
        self.generation = 0
        self._next: asyncio.Future[None] | None = None

    def update(self, urls: Mapping[int, str]) -> None:
        self.urls = dict(urls)
        self.generation += 1
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    def url_of(self, partition: int) -> str | None:
        return self.urls.get(partition)

    async def changed(self, generation: int) -> None:
        """Returns once the map is newer than ``generation``."""
        while self.generation == generation:
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._next)

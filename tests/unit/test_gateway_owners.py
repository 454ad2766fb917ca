"""The gateways' sticky partition assignment, its wire form and the owners map."""

from __future__ import annotations

import asyncio
import random

from gateway.cluster.owners import (
    Member,
    Owners,
    decode_map,
    decode_member,
    encode_map,
    encode_member,
    owner_urls,
    sticky_assign,
)


def counts(plan: dict[str, list[int]]) -> list[int]:
    return sorted(len(ps) for ps in plan.values())


def test_balanced_complete_and_deterministic() -> None:
    rng = random.Random(7)
    for _ in range(200):
        partitions = list(range(rng.randint(0, 24)))
        members = {
            f"m{i}": Member(f"http://g{i}", tuple(rng.sample(range(30), rng.randint(0, 6))))
            for i in range(rng.randint(1, 7))
        }
        plan = sticky_assign(partitions, members)
        assigned = [p for ps in plan.values() for p in ps]
        assert sorted(assigned) == partitions  # every partition to exactly one member
        assert counts(plan)[-1] - counts(plan)[0] <= 1
        assert sticky_assign(list(reversed(partitions)), dict(reversed(list(members.items())))) == plan


def test_a_member_keeps_what_it_reads_up_to_its_share() -> None:
    before = {"a": Member("A", (0, 1, 2)), "b": Member("B", (3, 4, 5))}
    assert sticky_assign(range(6), before) == {"a": [0, 1, 2], "b": [3, 4, 5]}
    # A third gateway joins: each of the others gives up one partition, nothing else moves.
    joined = {**before, "c": Member("C")}
    plan = sticky_assign(range(6), joined)
    assert set(plan["a"]) <= {0, 1, 2} and set(plan["b"]) <= {3, 4, 5} and len(plan["c"]) == 2
    # One dies: its partitions go to the survivors, who keep their own.
    survivors = {"a": Member("A", tuple(plan["a"])), "c": Member("C", tuple(plan["c"]))}
    after = sticky_assign(range(6), survivors)
    assert set(plan["a"]) <= set(after["a"]) and set(plan["c"]) <= set(after["c"])
    assert owner_urls(after, survivors) == {p: "A" if p in after["a"] else "C" for p in range(6)}


def test_wire_forms_round_trip_and_tolerate_garbage() -> None:
    member = Member("http://10.0.0.7:8080", (1, 4))
    assert decode_member(encode_member(member)) == member
    assert decode_member(b"\x00not json") == Member("")
    assert decode_member(b"") == Member("")
    urls = {0: "http://a", 3: "http://b"}
    assert decode_map(encode_map(urls)) == urls
    assert decode_map(b"[1, 2]") == {}


async def test_owners_wakes_waiters_on_the_next_generation() -> None:
    owners = Owners("http://me")
    waiter = asyncio.create_task(owners.changed(owners.generation))
    await asyncio.sleep(0)
    assert not waiter.done()
    owners.update({0: "http://other"})
    await asyncio.wait_for(waiter, 1)
    assert owners.url_of(0) == "http://other" and owners.url_of(1) is None
    await asyncio.wait_for(owners.changed(0), 1)  # already newer: returns at once

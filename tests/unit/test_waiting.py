"""wait_until: returns the condition's value, awaits async conditions, and fails with its message at the deadline."""

from __future__ import annotations

import pytest

from tests.waiting import wait_until


async def test_returns_the_first_truthy_value() -> None:
    calls = iter([0, None, "", 7])
    assert await wait_until(lambda: next(calls), "never", interval_s=0) == 7


async def test_awaits_an_async_condition() -> None:
    seen = []

    async def condition() -> bool:
        seen.append(1)
        return len(seen) == 3

    assert await wait_until(condition, "never", interval_s=0) is True


async def test_fails_at_the_deadline_with_the_message_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"the answer \(not within 0.01 s; last: 0\)"):
        await wait_until(lambda: 0, lambda: "the answer", timeout_s=0.01, interval_s=0.001)

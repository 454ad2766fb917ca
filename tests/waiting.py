"""The one way tests wait: poll a condition until it holds, with a deadline and a message saying what never came."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def wait_until(
    condition: Callable[[], Awaitable[T]],
    message: str | Callable[[], str],
    *,
    timeout_s: float = ...,
    interval_s: float = ...,
) -> T: ...


@overload
async def wait_until(
    condition: Callable[[], T],
    message: str | Callable[[], str],
    *,
    timeout_s: float = ...,
    interval_s: float = ...,
) -> T: ...


async def wait_until(
    condition: Callable[[], Any],
    message: str | Callable[[], str],
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.05,
) -> Any:
    """Until ``condition()`` (sync or async) is truthy; returns that value. AssertionError with ``message`` and the
    last value once ``timeout_s`` has passed: a wait never outlives its deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (not within {timeout_s:g} s; last: {value!r})")
        await asyncio.sleep(interval_s)

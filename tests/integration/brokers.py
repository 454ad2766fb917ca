"""Types of the broker fixtures, for the tests that annotate them."""

from __future__ import annotations

from collections.abc import Callable

from services.local.broker.runner import LocalBroker

LocalBrokerFactory = Callable[..., LocalBroker]

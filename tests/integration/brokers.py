"""Types of the broker fixtures, for the tests that annotate them."""

from __future__ import annotations

from collections.abc import Callable

from services.localbroker.runner import LocalBroker

LocalBrokerFactory = Callable[..., LocalBroker]

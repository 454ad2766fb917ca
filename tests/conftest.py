"""What every test shares: the tiny test model and an engine on it, loops whose threads cannot hold up the run,
child processes that end with their test, and the session's rules on skips and empty runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.isolation import bounded_loop, live_children, reap
from tests.tinymodel import build_tiny_model

if TYPE_CHECKING:
    from workers.engine.engine import Engine

# `make test` sets this: it has set up everything the suite needs, so a skipped test is a failure there.
REQUIRE_ALL = "TOKENRELAY_TEST_REQUIRE_ALL"
_CHILDREN = pytest.StashKey[set[int]]()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], object]]:
    """pytest-asyncio makes every test's loop here: see tests/isolation.py."""
    return {"bounded": bounded_loop}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama of tests/tinymodel.py, built once per session (read-only for tests)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    """An engine on the tiny model, fresh for each module."""
    from workers.engine.engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu", max_batch_size=8)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    item.stash[_CHILDREN] = live_children()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    # Processes the test body started (fixtures' own are theirs to stop) must not run on into the next test.
    before = item.stash.get(_CHILDREN, None)
    if before is not None:
        leaked = reap(live_children() - before)
        if leaked:
            reporter = item.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"\n{item.nodeid} left {len(leaked)} process(es) running, now stopped:", red=True)
                for line in leaked:
                    reporter.write_line(f"  {line}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        reporter.write_line("no tests were collected: that is a failure, not a pass", red=True)
        return
    skipped = reporter.stats.get("skipped", [])
    if os.environ.get(REQUIRE_ALL) == "1" and skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"{len(skipped)} skipped under {REQUIRE_ALL}=1: make test sets up everything", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

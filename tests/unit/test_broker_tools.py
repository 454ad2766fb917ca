"""The local broker names what to install when java or mvn is missing."""

from __future__ import annotations

import pytest

from schemas.errors import MissingToolError
from services.localbroker.runner import java_binary, mvn_binary


def test_missing_java_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingToolError, match="JDK 17"):
        java_binary()


def test_missing_maven_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingToolError, match="Maven"):
        mvn_binary()


def test_present_tools_are_found() -> None:
    assert java_binary().endswith("java")
    assert mvn_binary().endswith("mvn")

"""The local broker's tools: what to install when java or mvn is missing, a quiet Maven."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import BrokerError, MissingToolError
from services.local.broker.runner import ensure_jars, java_binary, maven_argv, mvn_binary, strip_ansi
from services.settings import Settings


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


def test_maven_runs_quiet_without_colours(tmp_path: Path) -> None:
    argv = maven_argv("mvn", tmp_path / "pom.xml", tmp_path / "cp")
    assert {"--batch-mode", "--quiet", "--no-transfer-progress", "-Dstyle.color=never"} <= set(argv)
    assert strip_ansi("\x1b[0m\x1b[1;31m[ERROR]\x1b[m boom") == "[ERROR] boom"


def test_jar_download_prints_one_line_and_the_error_only_on_failure(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pom = tmp_path / "pom.xml"
    # Valid XML, invalid model (a dependency without a version): Maven fails before any download.
    pom.write_text(
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        "<groupId>t</groupId><artifactId>t</artifactId><version>1</version><packaging>pom</packaging>"
        "<properties><kafka.version>0</kafka.version></properties>"
        "<dependencies><dependency><groupId>x</groupId><artifactId>y</artifactId></dependency></dependencies>"
        "</project>"
    )
    with pytest.raises(BrokerError) as caught:
        ensure_jars(Settings(cache_dir=tmp_path / "cache"), pom=pom)
    out, err = capfd.readouterr()
    assert out == ""
    assert err.splitlines() == ["resolving Kafka jars from Maven Central (first time only)… failed"]
    assert "\x1b" not in caught.value.message and "[ERROR]" in caught.value.message

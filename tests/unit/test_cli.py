"""The command line without a broker: versions, settings provenance, and user errors as one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main
from services.local.runstate import UpState, clear_state, read_state, write_state
from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    return env | {"TOKENRELAY_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)} | extra


def _run(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("tokenrelay ")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["tail", "--since", "5x"], {}, "cannot read '5x' as a time"),
        (["export", "--since", "1h", "--until", "yesterday"], {}, "cannot read 'yesterday' as a time"),
        (["submit", "hi", "--max-tokens", "0"], {}, "max_tokens: must be between 1 and"),
        (["submit", "hi", "--temperature", "9"], {}, "temperature: must be between"),
        (["settings"], {"TOKENRELAY_ENGINE": "synthtic"}, "did you mean synthetic?"),
        (["settings"], {"TOKENRELAY_EVENTS_PARTITIONS": "many"}, "TOKENRELAY_EVENTS_PARTITIONS='many'"),
        (["submit", "hi"], {"TOKENRELAY_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, "no Kafka broker answers at 127.0.0.1:1"),
    ],
)
def test_user_errors_are_one_line_without_a_traceback(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    done = _run(tmp_path, *args, **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_settings_shows_values_in_effect_and_their_source(tmp_path: Path) -> None:
    done = _run(tmp_path, "--log-level", "ERROR", "settings", TOKENRELAY_BROKER_PORT="19999", TOKENRELAY_MODLE="y")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in done.stdout.splitlines()[1:]}
    assert rows["TOKENRELAY_BROKER_PORT"] == ["19999", "environment"]
    # The clients' broker follows the local broker's port.
    assert rows["TOKENRELAY_KAFKA_BOOTSTRAP"][0] == "127.0.0.1:19999"
    assert rows["TOKENRELAY_LOG_LEVEL"] == ["ERROR", "flag --log-level"]
    assert rows["TOKENRELAY_ENGINE"] == ["model", "default"]
    assert "TOKENRELAY_MODLE is not a tokenrelay setting" in done.stderr and "TOKENRELAY_MODEL?" in done.stderr


def test_client_commands_follow_a_running_up(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    # This test process stands in for the running `tokenrelay up`.
    write_state(settings, UpState(os.getpid(), "127.0.0.1:19111", "mine.", True, "http://g", "http://a"))
    try:
        done = _run(tmp_path, "settings")
        rows = {line.split()[0]: line.split(None, 2)[1:] for line in done.stdout.splitlines()[1:]}
        assert rows["TOKENRELAY_KAFKA_BOOTSTRAP"] == [
            "127.0.0.1:19111",
            f"the running `tokenrelay up` (pid {os.getpid()})",
        ]
        assert rows["TOKENRELAY_TOPIC_PREFIX"][0] == "mine."
        # An explicit address wins over the running stack.
        done = _run(tmp_path, "settings", TOKENRELAY_KAFKA_BOOTSTRAP="k:9092")
        assert "k:9092" in done.stdout
    finally:
        clear_state(settings, os.getpid())
    assert read_state(settings) is None


def test_a_stale_state_file_is_ignored(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(settings, UpState(dead.pid, "127.0.0.1:19111", "x.", True, "http://g", "http://a"))
    assert read_state(settings) is None


def test_tail_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # `tokenrelay settings | head -1` is the broker-free stand-in for `tail | head`: the same BrokenPipe path.
    script = f"{sys.executable} -m services.cli settings --markdown | head -1"
    done = subprocess.run(["sh", "-c", script], env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("| variable |")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_acls_prints_each_roles_kafka_acls_lines(tmp_path: Path) -> None:
    result = _run(tmp_path, "acls", "--models", "a,b", "--principal", "gateway=User:gw-prod")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "# gateway (User:gw-prod)" in lines
    assert any(
        "--allow-principal User:worker --operation Read --topic 'tokenrelay.requests.b'" in line for line in lines
    )
    assert any(
        "--allow-principal User:gw-prod --operation Read --group 'tokenrelay.gateways'" in line for line in lines
    )
    wrong = _run(tmp_path, "acls", "--principal", "janitor=User:x")
    assert wrong.returncode != 0 and "ROLE=PRINCIPAL" in wrong.stderr and "Traceback" not in wrong.stderr


def test_secure_settings_missing_a_password_are_one_line(tmp_path: Path) -> None:
    result = _run(tmp_path, "settings", TOKENRELAY_KAFKA_SECURITY_PROTOCOL="SASL_SSL")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "needs TOKENRELAY_KAFKA_SASL_USERNAME and TOKENRELAY_KAFKA_SASL_PASSWORD" in result.stderr

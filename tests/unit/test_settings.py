"""Settings: environment parsing and the documented table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from services.settings import Settings, settings_table


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.events_topic == "tokenrelay.events"
    assert s.dlq_topic == "tokenrelay.requests.dlq"


def test_environment_is_parsed_by_type() -> None:
    s = Settings.from_env(
        {
            "TOKENRELAY_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "TOKENRELAY_EVENTS_PARTITIONS": "12",
            "TOKENRELAY_KEEPALIVE_S": "2.5",
            "TOKENRELAY_API_KEYS": "a, b,,",
            "TOKENRELAY_CACHE_DIR": "/tmp/x",
        }
    )
    assert s.kafka_bootstrap == "k1:9092,k2:9092"
    assert s.events_partitions == 12
    assert s.keepalive_s == 2.5
    assert s.api_keys == ("a", "b")
    assert s.cache_dir == Path("/tmp/x")


def test_overrides_win_and_none_is_ignored() -> None:
    s = Settings.from_env({"TOKENRELAY_GATEWAY_PORT": "1"}, gateway_port=2, model=None)
    assert s.gateway_port == 2
    assert s.model == "default"


def test_bad_number_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="events_partitions"):
        Settings.from_env({"TOKENRELAY_EVENTS_PARTITIONS": "many"})


def test_every_field_is_documented_with_its_variable() -> None:
    table = settings_table()
    for f in dataclasses.fields(Settings):
        assert f.metadata["env"].startswith("TOKENRELAY_")
        assert f.metadata["doc"]
        assert f"`{f.metadata['env']}`" in table


def test_readme_has_the_settings_table() -> None:
    readme = Path(__file__).resolve().parents[2] / "README.md"
    text = readme.read_text()
    for f in dataclasses.fields(Settings):
        assert f"`{f.metadata['env']}`" in text, f"README lacks {f.metadata['env']}"


def test_to_env_round_trips() -> None:
    s = Settings.from_env({}, api_keys=("a", "b"), events_partitions=3, keepalive_s=0.5, cache_dir=Path("/tmp/c"))
    assert Settings.from_env(s.to_env()) == s

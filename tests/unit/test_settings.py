"""Settings: environment parsing and the documented table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from services.settings import Settings, effective_table, settings_table, sources, unknown_variables


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


def test_to_env_round_trips() -> None:
    s = Settings.from_env({}, api_keys=("a", "b"), events_partitions=3, keepalive_s=0.5, cache_dir=Path("/tmp/c"))
    assert Settings.from_env(s.to_env()) == s


def test_an_unknown_choice_is_an_error_naming_the_variable_and_the_likely_value() -> None:
    with pytest.raises(
        ConfigError,
        match=r"TOKENRELAY_ENGINE='synthtic' is not one of model, vllm, synthetic \(did you mean synthetic\?\)",
    ):
        Settings.from_env({"TOKENRELAY_ENGINE": "synthtic"})
    with pytest.raises(ConfigError, match="TOKENRELAY_DTYPE"):
        Settings(dtype="fp8")
    with pytest.raises(ConfigError, match="TOKENRELAY_DEVICE"):
        Settings(device="gpu")
    with pytest.raises(ConfigError, match="TOKENRELAY_GATEWAY_PORT=70000"):
        Settings(gateway_port=70000)
    assert Settings(log_level="debug", device="cuda:1").log_level == "debug"


def test_unknown_variables_are_reported_with_a_suggestion() -> None:
    env = {"TOKENRELAY_MODLE": "x", "TOKENRELAY_MODEL": "y", "TOKENRELAY_TEST_KAFKA": "k:1", "OTHER": "z"}
    assert unknown_variables(env) == [
        "TOKENRELAY_MODLE is not a tokenrelay setting and is ignored (did you mean TOKENRELAY_MODEL?)"
    ]


def test_sources_say_where_each_value_came_from() -> None:
    where = sources({"TOKENRELAY_MODEL": "m", "TOKENRELAY_ENGINE": ""}, {"gateway_port": "flag --gateway-port"})
    assert where["model"] == "environment"
    assert where["engine"] == "default"  # an empty variable is unset
    assert where["gateway_port"] == "flag --gateway-port"
    table = effective_table(Settings(model="m", api_keys=("secret",)), where)
    assert "TOKENRELAY_MODEL" in table and " m " in table and "secret" not in table


def test_relay_defaults_are_the_settings_defaults() -> None:
    import inspect

    from gateway.fanout.relay import Relay

    params = inspect.signature(Relay).parameters
    defaults = Settings()
    assert params["memory_events"].default == defaults.hub_memory_events
    assert params["memory_total_events"].default == defaults.hub_memory_total_events
    assert params["subscriber_buffer"].default == defaults.subscriber_buffer
    assert params["max_requests"].default == defaults.hub_max_requests


def test_the_default_model_cache_follows_the_cache_dir_setting(tmp_path: Path) -> None:
    from workers.model.registry import DEFAULT_MODEL_NAME, _cache_dir

    assert _cache_dir(tmp_path) == tmp_path / "models" / DEFAULT_MODEL_NAME


def test_tenant_weights_and_the_class_topics() -> None:
    s = Settings.from_env({"TOKENRELAY_TENANT_WEIGHTS": "k_0123456789ab=3, nightly=0.5"})
    assert s.tenant_weight_map == {"k_0123456789ab": 3.0, "nightly": 0.5}
    assert s.requests_topic_for("m") == "tokenrelay.requests.m"
    assert s.requests_topic_for("m", "batch") == "tokenrelay.batch.m"
    for bad in ("a", "a=0", "a=-1", "=2", "a=x"):
        with pytest.raises(ConfigError, match="TOKENRELAY_TENANT_WEIGHTS"):
            Settings.from_env({"TOKENRELAY_TENANT_WEIGHTS": bad})
    with pytest.raises(ConfigError, match="TOKENRELAY_SCHEDULER_LOOKAHEAD"):
        Settings.from_env({"TOKENRELAY_SCHEDULER_LOOKAHEAD": "0"})

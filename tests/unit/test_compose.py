"""docker-compose.yml against the Compose specification's JSON schema (vendored: no Docker engine in CI)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# From compose-spec/compose-spec (schema/compose-spec.json, Apache-2.0), as vendored by check-jsonschema 0.39.0.
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(node: Any) -> Any:
    """Compose's ${VAR:-default} interpolation, with every variable unset."""
    if isinstance(node, str):
        return _VAR.sub(lambda m: m.group(2) or "", node)
    if isinstance(node, list):
        return [_interpolate(v) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate(v) for k, v in node.items()}
    return node


def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors_of(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return _interpolate(data)


def test_compose_file_follows_the_specification(compose: dict[str, Any]) -> None:
    assert errors_of(compose) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["services"]["gateway"].__setitem__("bogus_key", 1),
        lambda d: d["services"]["kafka"].__setitem__("ports", "9092:9092"),
        lambda d: d["services"]["gateway"]["healthcheck"].__setitem__("interval", ["10s"]),
        lambda d: d["services"]["worker-gpu"]["deploy"]["resources"]["reservations"].__setitem__("gpus", "all"),
        lambda d: d.__setitem__("service", {}),
    ],
    ids=["unknown-key", "ports-not-a-list", "bad-healthcheck", "bad-reservation", "typo-top-level"],
)
def test_validation_fails_on_an_invalid_file(compose: dict[str, Any], mutate: Any) -> None:
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert errors_of(broken) != []


def test_stack_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "topics", "worker", "worker-gpu", "gateway", "analytics"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "healthcheck" in kafka
    assert services["topics"]["command"] == ["topics"]
    for name in ("worker", "worker-gpu", "gateway", "analytics"):
        service = services[name]
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert service["environment"]["TOKENRELAY_KAFKA_BOOTSTRAP"] == "kafka:9092"
    for name in ("gateway", "analytics"):
        assert "healthcheck" in services[name]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["worker"]["profiles"] == ["cpu"]
    for service in services.values():
        for dep in service.get("depends_on", {}):
            assert dep in services


def test_default_profile_runs_the_cpu_worker() -> None:
    env = (ROOT / ".env").read_text()
    assert re.search(r"^COMPOSE_PROFILES=cpu$", env, re.M)


def test_schema_registry_serves_every_component(compose: dict[str, Any]) -> None:
    services = compose["services"]
    registry = services["registry"]
    assert registry["image"].startswith("apicurio/apicurio-registry:")
    assert registry["environment"]["APICURIO_STORAGE_KIND"] == "kafkasql"
    assert registry["environment"]["APICURIO_KAFKASQL_BOOTSTRAP_SERVERS"] == "kafka:9092"
    for name in ("worker", "worker-gpu", "gateway", "analytics", "topics"):
        url = services[name]["environment"]["TOKENRELAY_SCHEMA_REGISTRY_URL"]
        assert url == "http://registry:8080/apis/ccompat/v7"


def test_gpu_worker_builds_torch_from_a_cuda_index(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert "/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    assert gpu["image"] != compose["services"]["worker"]["image"]
    assert "ARG TORCH_INDEX" in (ROOT / "Dockerfile").read_text()


def test_vllm_profile_runs_a_gpu_worker_on_the_vllm_engine(compose: dict[str, Any]) -> None:
    services = compose["services"]
    vllm = services["worker-vllm"]
    assert vllm["profiles"] == ["vllm"]
    assert vllm["build"]["args"]["EXTRAS"] == "[vllm]"
    assert vllm["environment"]["TOKENRELAY_ENGINE"] == "vllm"
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert vllm["image"] not in {services["worker"]["image"], services["worker-gpu"]["image"]}
    assert 'pip install ".${EXTRAS}"' in (ROOT / "Dockerfile").read_text()

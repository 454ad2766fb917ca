"""The shipped Grafana dashboard and Prometheus config against the code: every panel's query names only metrics some
component exports, every component's /metrics is scraped, and the provisioning points where docker-compose mounts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.registry import Collector, CollectorRegistry

from gateway.cluster.queue_watch import QueueCollector as GatewayQueueCollector
from gateway.cluster.queued import QueueBook
from gateway.metrics import GatewayMetrics
from services.analytics.app import AnalyticsMetrics
from services.settings import Settings
from workers import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tokenrelay.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "tokenrelay.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"

# The series names each metric type exposes (prometheus_client's text format).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
_FUNCTION_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_OPERATOR_WORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "group_left", "group_right"}


def _names(collectors: Iterable[Collector | CollectorRegistry]) -> set[str]:
    names: set[str] = set()
    for collector in collectors:
        for family in collector.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def exported_metrics() -> set[str]:
    """Every series name the gateway, worker and analytics processes expose on /metrics."""
    gateway = GatewayMetrics()
    gateway.registry.register(GatewayQueueCollector(SimpleNamespace(book=QueueBook())))  # type: ignore[arg-type]
    return _names([gateway.registry, worker_metrics.REGISTRY, AnalyticsMetrics().registry])


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, grouping labels, matchers and ranges left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(rf"\b(?:{'|'.join(_FUNCTION_KEYWORDS)})\s*\([^)]*\)", "", text)  # by (le), on (...), ...
    text = re.sub(r"\b(?:\d+(?:ms|[smhdwy]))+\b", "", text)  # durations (offset 5m)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(?P<call>\s*\()?|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", text):
        word = match.group(0)
        if match.group("call") or word[0].isdigit() or word.lower() in _OPERATOR_WORDS:
            continue
        names.add(word)
    return names


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def test_the_expression_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(time_to_first_token_seconds_bucket{model="a b", le!="+Inf"}'
        "[$__rate_interval]))) / on (model) group_left sum without (instance) (batch_slots offset 5m) > bool 1e3"
    )
    assert metric_names(expr) == {"time_to_first_token_seconds_bucket", "batch_slots"}
    assert metric_names("sum(rate(a_total[5m])) and b or c unless max_over_time(d[1h:5m])") == {
        "a_total",
        "b",
        "c",
        "d",
    }


def test_every_panel_query_names_only_metrics_the_code_exports() -> None:
    exported = exported_metrics()
    assert {
        "time_to_first_token_seconds_bucket",
        "tokenrelay_consumer_lag",
        "tokenrelay_gateway_connections",
    } <= exported
    queries = [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]
    assert len(queries) >= 20
    unknown = {name: expr for expr in queries for name in metric_names(expr) if name not in exported}
    assert unknown == {}
    named = set().union(*(metric_names(q) for q in queries))
    for wanted in (
        "tokenrelay_gateway_requests_submitted_total",  # request rate
        "tokenrelay_gateway_queued_requests",  # queue depth per model
        "time_to_first_token_seconds_bucket",  # TTFT
        "inter_token_latency_seconds_bucket",  # ITL
        "generation_tokens_total",  # tokens/s
        "batch_slots_used",  # batch occupancy
        "kv_cache_usage_perc",  # KV use
        "tokenrelay_gateway_connections",  # gateway connections
        "tokenrelay_consumer_lag",  # consumer lag per group
    ):
        assert wanted in named


def test_a_query_of_a_metric_nobody_exports_is_caught() -> None:
    assert metric_names("sum(rate(tokenrelay_gateway_requests_submited_total[1m]))") - exported_metrics() == {
        "tokenrelay_gateway_requests_submited_total"
    }
    assert "time_to_first_token_seconds_total" not in exported_metrics()  # a histogram has no _total series


def test_the_dashboard_is_well_formed_for_grafana() -> None:
    dashboard = _dashboard()
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid and panel["targets"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    assert dashboard["uid"] and dashboard["title"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_prometheus_scrapes_every_component_where_compose_runs_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    assert set(jobs) == {"gateway", "worker", "analytics"}
    ports = {
        "gateway": int(services["gateway"]["environment"]["TOKENRELAY_GATEWAY_PORT"]),
        "worker": Settings().worker_metrics_port,
        "analytics": int(services["analytics"]["environment"]["TOKENRELAY_ANALYTICS_PORT"]),
    }
    for name, job in jobs.items():
        assert job["metrics_path"] == "/metrics"
        (sd,) = job["dns_sd_configs"]
        assert sd["port"] == ports[name]
        assert all(host in services for host in sd["names"])
    for worker in ("worker", "worker-gpu", "worker-vllm"):  # reachable from the prometheus container
        assert services[worker]["environment"]["TOKENRELAY_WORKER_METRICS_HOST"] == "0.0.0.0"


def test_compose_mounts_the_provisioning_where_grafana_reads_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == PROVIDERS.parents[1]
    dashboards_dir = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert (ROOT / mounts[dashboards_dir]).resolve() == DASHBOARD.parent
    prometheus_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert (ROOT / prometheus_mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services

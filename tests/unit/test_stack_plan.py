"""`tokenrelay up`: the child-process plan, the banner and the progress lines, without starting anything."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from services.local.readiness import sse_events
from services.local.stack import Progress, banner, child_plan, curl_line
from services.settings import Settings


def test_children_share_the_cluster_and_start_in_order() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:19999", topic_prefix="x.", gateway_port=8181, analytics_port=6161)
    plan = child_plan(settings, base_env={"PATH": "/bin", "TOKENRELAY_MODLE": "typo", "TOKENRELAY_TEST_KAFKA": "k"})
    assert [c.name for c in plan] == ["worker", "gateway", "analytics"]
    for child in plan:
        assert child.argv[:3] == (sys.executable, "-m", "services.cli")
        assert child.env["TOKENRELAY_KAFKA_BOOTSTRAP"] == "127.0.0.1:19999"
        assert child.env["TOKENRELAY_TOPIC_PREFIX"] == "x."
        assert child.env["PATH"] == "/bin"
        # `up` reported the unknown variable once; the children do not repeat it.
        assert "TOKENRELAY_MODLE" not in child.env and child.env["TOKENRELAY_TEST_KAFKA"] == "k"
    assert plan[1].ready_url == "http://127.0.0.1:8181/readyz"
    assert plan[2].ready_url == "http://127.0.0.1:6161/usage"


def test_banner_has_the_urls_a_curl_line_and_the_logs() -> None:
    settings = Settings(gateway_host="0.0.0.0", gateway_port=8080, analytics_port=6066, engine="synthetic")
    text = banner(settings, local_broker=True, logs=Path.home() / ".cache/tokenrelay/logs")
    assert "tokenrelay is ready: synthetic engine" in text
    assert "http://127.0.0.1:8080/" in text and "http://127.0.0.1:8080/examples/" in text
    assert "http://127.0.0.1:6066/" in text
    assert curl_line(settings) in text and curl_line(settings).startswith("curl -s http://127.0.0.1:8080/v1/chat/")
    assert "local broker" in text and "~/.cache/tokenrelay/logs/" in text
    assert "existing cluster" in banner(settings, local_broker=False, logs=None)


def test_curl_line_carries_the_first_api_key() -> None:
    assert "authorization: Bearer k1" in curl_line(Settings(api_keys=("k1", "k2")))


def test_progress_without_a_terminal_prints_one_line_per_step() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress.begin("gateway", "http://127.0.0.1:8080")
    progress.tick("starting")  # too soon after begin: nothing
    progress.end("ready")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("  gateway    http://127.0.0.1:8080: ready (")


def test_sse_events_parse_what_the_probe_reads() -> None:
    raw = [b"retry: 1000\n", b"\n", b": keepalive\n", b"\n", b"id: A\n", b"event: started\n", b'data: {"a": 1}\n']
    raw += [b"\n", b"event: done\n", b'data: {"finish_reason": "length"}\n', b"\n"]
    assert list(sse_events(iter(raw))) == [("started", {"a": 1}), ("done", {"finish_reason": "length"})]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    out = _Terminal()
    progress = Progress(out)
    progress.begin("worker", "the built-in model")
    progress.end("answered a first request")
    text = out.getvalue()
    assert text.startswith("  worker     the built-in model …\r\x1b[K  worker     the built-in model: answered")
    assert text.count("\n") == 1


def test_progress_leaves_no_open_line_when_a_tool_prints_meanwhile() -> None:
    out = _Terminal()
    progress = Progress(out)
    progress.begin("kafka", "jars", others_print=True)
    assert out.getvalue().endswith("…\n")


def test_the_embedded_registry_starts_first_and_everyone_is_told_its_url() -> None:
    url = "http://127.0.0.1:18081/apis/ccompat/v7"
    settings = Settings(schema_registry_url=url, registry_port=18081)
    plan = child_plan(settings, base_env={"PATH": "/bin"}, registry=True)
    assert [c.name for c in plan] == ["registry", "worker", "gateway", "analytics"]
    assert plan[0].argv[-3:] == ("registry", "--port", "18081") and plan[0].ready_url == f"{url}/subjects"
    assert not plan[0].before_others  # it starts while the worker loads its model
    assert all(c.env["TOKENRELAY_SCHEMA_REGISTRY_URL"] == url for c in plan)
    assert [c.name for c in child_plan(settings, base_env={})] == ["worker", "gateway", "analytics"]


def test_a_secure_stack_runs_each_child_as_its_role() -> None:
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="admin",
        kafka_sasl_password="admin-pw",
        schema_registry_url="http://127.0.0.1:8081/apis/ccompat/v7",
    )
    passwords = {role: f"{role}-pw" for role in ("worker", "gateway", "analytics", "producer", "registry")}
    plan = child_plan(settings, base_env={}, registry=True, passwords=passwords)
    for child in plan:
        assert child.env["TOKENRELAY_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert child.env["TOKENRELAY_KAFKA_SASL_USERNAME"] == child.name
        assert child.env["TOKENRELAY_KAFKA_SASL_PASSWORD"] == f"{child.name}-pw"
    assert "admin-pw" not in str([c.env for c in plan])

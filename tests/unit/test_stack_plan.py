"""`tokenrelay up`: the child-process plan and the banner, without starting anything."""

from __future__ import annotations

import sys

from services.settings import Settings
from services.stack import banner, child_plan


def test_children_share_the_cluster_and_start_in_order() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:19999", topic_prefix="x.", gateway_port=8181, analytics_port=6161)
    plan = child_plan(settings, base_env={"PATH": "/bin"})
    assert [c.name for c in plan] == ["worker", "gateway", "analytics"]
    for child in plan:
        assert child.argv[:3] == (sys.executable, "-m", "services.cli")
        assert child.env["TOKENRELAY_KAFKA_BOOTSTRAP"] == "127.0.0.1:19999"
        assert child.env["TOKENRELAY_TOPIC_PREFIX"] == "x."
        assert child.env["PATH"] == "/bin"
    assert plan[1].ready_url == "http://127.0.0.1:8181/readyz"
    assert plan[2].ready_url == "http://127.0.0.1:6161/usage"


def test_banner_has_the_urls_and_a_curl_example() -> None:
    settings = Settings(gateway_host="0.0.0.0", gateway_port=8080, analytics_port=6066, engine="synthetic")
    text = banner(settings, local_broker=True)
    assert "http://127.0.0.1:8080/" in text
    assert "http://127.0.0.1:6066/" in text
    assert "curl -s http://127.0.0.1:8080/v1/requests" in text
    assert "synthetic" in text and "local broker" in text

"""Unit tests of the local broker's pure config rendering (server.properties, log4j2, cluster id)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from services.local.broker import config


def render(**kwargs: object) -> dict[str, str]:
    args: dict[str, object] = {"port": 19092, "controller_port": 19093, "data_dir": Path("/data/kafka")}
    args.update(kwargs)
    return config.parse_properties(config.render_server_properties(**args))  # type: ignore[arg-type]


def test_single_node_kraft_keys() -> None:
    props = render()
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert props["log.dirs"] == "/data/kafka/logs"


def test_small_machine_and_single_replica_settings() -> None:
    props = render()
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "offsets.topic.num.partitions",
        "transaction.state.log.num.partitions",
        "default.replication.factor",
    ):
        assert props[key] == "1", key
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert int(props["log.cleaner.dedupe.buffer.size"]) <= 16 * 1024 * 1024
    assert props["auto.create.topics.enable"] == "false"
    assert props["num.partitions"] == "1"


def test_num_partitions_and_extra_overrides() -> None:
    props = render(num_partitions=4, extra={"auto.create.topics.enable": "true", "log.retention.ms": "1000"})
    assert props["num.partitions"] == "4"
    assert props["auto.create.topics.enable"] == "true"
    assert props["log.retention.ms"] == "1000"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"controller_port": 19092}, "must differ"),
        ({"port": 0}, "port must be in"),
        ({"controller_port": 70000}, "controller_port must be in"),
        ({"num_partitions": 0}, "num_partitions"),
    ],
)
def test_rejects_bad_values(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(**kwargs)


def test_rendering_is_deterministic_and_line_based() -> None:
    a = config.render_server_properties(port=1, controller_port=2, data_dir=Path("/d"))
    b = config.render_server_properties(port=1, controller_port=2, data_dir=Path("/d"))
    assert a == b
    assert a.endswith("\n")
    body = [line for line in a.splitlines() if not line.startswith("#")]
    assert all("=" in line for line in body)
    assert len(body) == len({line.split("=", 1)[0] for line in body})


@pytest.mark.parametrize("directory", ["/tmp/with space/kafka", "/tmp/ünïcode/😀", "C:\\odd\\path", "/a=b:c"])
def test_paths_survive_java_properties_escaping(directory: str) -> None:
    text = config.render_server_properties(port=1, controller_port=2, data_dir=Path(directory))
    # Kafka reads server.properties as ISO-8859-1.
    text.encode("latin-1")
    assert config.parse_properties(text)["log.dirs"] == str(Path(directory) / "logs")


def test_properties_round_trip_special_keys_and_values() -> None:
    props = {"a=b": "x", "c:d": "tab\there", "e f": "back\\slash", "multi": "line\nbreak"}
    assert config.parse_properties(config.render_properties(props)) == props


def test_cluster_id_format() -> None:
    ids = {config.new_cluster_id() for _ in range(50)}
    assert len(ids) == 50
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert config.is_valid_cluster_id(cluster_id)
    assert not config.is_valid_cluster_id("")
    assert not config.is_valid_cluster_id("too-short")
    assert not config.is_valid_cluster_id("!" * 22)
    # StorageTool's parser reads a leading '-' as an option: `format -t -abc…` fails.
    assert not config.is_valid_cluster_id("-" + "A" * 21)
    assert not any(config.new_cluster_id().startswith("-") for _ in range(2000))


def test_log4j2_xml_logs_warn_to_console_and_info_to_file(tmp_path: Path) -> None:
    log_file = tmp_path / 'a "quoted" & <dir>' / "broker.log"
    root = ET.fromstring(config.render_log4j2_xml(log_file))
    console = root.find("Appenders/Console")
    assert console is not None
    threshold = console.find("ThresholdFilter")
    assert threshold is not None and threshold.get("level") == "WARN"
    rolling = root.find("Appenders/RollingFile")
    assert rolling is not None and rolling.get("fileName") == str(log_file)
    root_logger = root.find("Loggers/Root")
    assert root_logger is not None and root_logger.get("level") == "INFO"
    assert {ref.get("ref") for ref in root_logger.findall("AppenderRef")} == {"console", "file"}

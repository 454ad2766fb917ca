"""Unit tests of the local cluster's pure parts: node configs, ports, replication settings, DescribeQuorum bytes."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from services.local.broker import config
from services.local.broker.cluster import PORT_RANGE, default_data_dir, free_port_block, node_ports
from services.local.broker.quorum import describe_quorum_request, leader_from_response
from services.settings import Settings
from services.topics import replication_config

VOTERS = {1: 19103, 2: 19104, 3: 19105}


def node_props(node_id: int) -> dict[str, str]:
    text = config.render_server_properties(
        port=19100 + node_id - 1,
        controller_port=VOTERS[node_id],
        data_dir=Path(f"/data/node-{node_id}"),
        node_id=node_id,
        voters=VOTERS,
    )
    return config.parse_properties(text)


def test_every_node_names_the_whole_quorum_and_its_own_listeners() -> None:
    for node_id in VOTERS:
        props = node_props(node_id)
        assert props["node.id"] == str(node_id)
        assert props["controller.quorum.voters"] == "1@127.0.0.1:19103,2@127.0.0.1:19104,3@127.0.0.1:19105"
        port = 19100 + node_id - 1
        assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{VOTERS[node_id]}"
        assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{port}"
        assert props["log.dirs"] == f"/data/node-{node_id}/logs"


def test_three_nodes_replicate_internal_topics_three_times_with_two_in_sync() -> None:
    props = node_props(2)
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "default.replication.factor",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert props[key] == "3", key
    for key in ("min.insync.replicas", "transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr"):
        assert props[key] == "2", key


@pytest.mark.parametrize(("nodes", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))])
def test_cluster_replication(nodes: int, expected: tuple[int, int]) -> None:
    assert config.cluster_replication(nodes) == expected


def test_node_must_be_a_voter_on_its_own_port_and_ports_must_differ() -> None:
    with pytest.raises(ValueError, match="must be a voter"):
        config.server_properties(port=1, controller_port=5, data_dir=Path("/d"), node_id=1, voters=VOTERS)
    with pytest.raises(ValueError, match="must differ"):
        config.server_properties(port=19104, controller_port=19103, data_dir=Path("/d"), node_id=1, voters=VOTERS)
    with pytest.raises(ValueError, match="must differ"):
        config.server_properties(port=1, controller_port=7, data_dir=Path("/d"), node_id=1, voters={1: 7, 2: 7})


def test_node_ports_clients_first_then_controllers() -> None:
    assert node_ports(9092, 3) == ([9092, 9093, 9094], [9095, 9096, 9097])
    with pytest.raises(ValueError):
        node_ports(65533, 3)
    with pytest.raises(ValueError):
        node_ports(9092, 0)


def test_free_port_block_stays_below_the_ephemeral_range() -> None:
    base = free_port_block(6, random.Random(3))
    assert PORT_RANGE[0] <= base and base + 6 <= PORT_RANGE[1] < 32768


def test_cluster_data_dir_is_not_the_single_nodes() -> None:
    settings = Settings(broker_data_dir=Path("/c/broker-data"))
    assert default_data_dir(settings, 3) == Path("/c/broker-data-3nodes")


def test_replication_config_from_settings() -> None:
    assert replication_config(Settings()) == {"min.insync.replicas": "1"}
    assert replication_config(Settings(replication_factor=3, min_insync_replicas=2)) == {"min.insync.replicas": "2"}
    with pytest.raises(ConfigError, match="exceeds"):
        replication_config(Settings(replication_factor=1, min_insync_replicas=2))
    with pytest.raises(ConfigError):
        replication_config(Settings(replication_factor=0))


def test_describe_quorum_request_bytes() -> None:
    request = describe_quorum_request(correlation_id=9, client_id=b"c")
    (size,) = struct.unpack(">i", request[:4])
    assert size == len(request) - 4
    api_key, version, correlation = struct.unpack(">hhi", request[4:12])
    assert (api_key, version, correlation) == (55, 0, 9)
    assert request[12:16] == b"\x00\x01c\x00"  # client id, empty tagged fields
    assert request[16:] == b"\x02\x13__cluster_metadata\x02\x00\x00\x00\x00\x00\x00\x00"


def quorum_response(correlation_id: int, leader: int, error: int = 0, partition_error: int = 0) -> bytes:
    body = struct.pack(">i", correlation_id) + b"\x00"  # header v1: correlation id, no tagged fields
    body += struct.pack(">h", error) + b"\x02" + b"\x13__cluster_metadata" + b"\x02"
    body += struct.pack(">ihiiq", 0, partition_error, leader, 4, 120) + b"\x01\x01\x00\x00\x00"
    return body


def test_leader_from_response() -> None:
    assert leader_from_response(quorum_response(7, 2), 7) == 2
    assert leader_from_response(quorum_response(8, 2), 7) is None
    assert leader_from_response(quorum_response(7, 2, error=3), 7) is None
    assert leader_from_response(quorum_response(7, 2, partition_error=6), 7) is None
    assert leader_from_response(quorum_response(7, -1), 7) is None
    assert leader_from_response(b"\x00\x00", 7) is None


def test_cluster_nodes_skip_controlled_shutdown_and_a_single_node_keeps_it() -> None:
    assert node_props(1)["controlled.shutdown.enable"] == "false"
    single = config.server_properties(port=1, controller_port=2, data_dir=Path("/d"))
    assert "controlled.shutdown.enable" not in single

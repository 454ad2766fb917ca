"""Port checks before any slow work: one line naming the port and how to move it."""

from __future__ import annotations

import socket

import pytest

from schemas.errors import ConfigError
from services.local.ports import check_ports, listens, port_free
from services.settings import Settings


def test_a_busy_port_names_the_flag_and_the_variable() -> None:
    settings = Settings(gateway_port=8181, analytics_port=6161, broker_port=9191, worker_metrics_port=0)
    wanted = listens(settings, ["broker", "worker", "gateway", "analytics"])
    assert [w.port for w in wanted] == [9191, 8181, 6161]  # metrics port 0 is off
    with pytest.raises(ConfigError) as info:
        check_ports(wanted, free=lambda host, port: port != 8181)
    assert str(info.value) == (
        "port 8181 (gateway) is already in use: stop what listens there, "
        "or pick another port with --gateway-port or TOKENRELAY_GATEWAY_PORT"
    )
    check_ports(wanted, free=lambda host, port: True)


def test_a_standalone_component_names_its_port_flag() -> None:
    [gateway] = listens(Settings(gateway_port=8181), ["gateway"], standalone=True)
    assert gateway.flag == "--port"


def test_the_same_port_twice_is_an_error() -> None:
    wanted = listens(Settings(gateway_port=7000, analytics_port=7000), ["gateway", "analytics"])
    with pytest.raises(ConfigError, match="port 7000 is asked for by both the gateway and the analytics"):
        check_ports(wanted, free=lambda host, port: True)


def test_port_free_sees_a_listening_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_free("127.0.0.1", port)

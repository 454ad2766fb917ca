"""The ports a component listens on, checked before any slow work so that a clash is one clear line."""

from __future__ import annotations

import dataclasses
import errno
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from schemas.errors import ConfigError
from services.settings import Settings


@dataclass(frozen=True, slots=True)
class Listen:
    """One port a component binds, and how the user moves it."""

    component: str
    host: str
    port: int
    flag: str
    env: str


def listens(settings: Settings, components: Iterable[str], *, standalone: bool = False) -> list[Listen]:
    """The fixed ports of ``components`` (broker, worker, gateway, analytics); port 0 (off or any) is left out.

    ``standalone``: the component runs as its own command, whose flag is ``--port``.
    """
    known = {
        "broker": Listen(
            "local Kafka broker", "127.0.0.1", settings.broker_port, "--broker-port", "TOKENRELAY_BROKER_PORT"
        ),
        "worker": Listen(
            "worker metrics",
            "0.0.0.0",
            settings.worker_metrics_port,
            "--metrics-port",
            "TOKENRELAY_WORKER_METRICS_PORT",
        ),
        "gateway": Listen(
            "gateway", settings.gateway_host, settings.gateway_port, "--gateway-port", "TOKENRELAY_GATEWAY_PORT"
        ),
        "analytics": Listen(
            "analytics", "0.0.0.0", settings.analytics_port, "--analytics-port", "TOKENRELAY_ANALYTICS_PORT"
        ),
        "registry": Listen(
            "schema registry", "127.0.0.1", settings.registry_port, "--registry-port", "TOKENRELAY_REGISTRY_PORT"
        ),
    }
    chosen = [known[c] for c in components if known[c].port != 0]
    return [dataclasses.replace(c, flag="--port") for c in chosen] if standalone else chosen


def port_free(host: str, port: int) -> bool:
    """True when a listening socket could bind ``host:port`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_ports(wanted: Iterable[Listen], free: Callable[[str, int], bool] = port_free) -> None:
    """ConfigError naming the first port in use (or asked twice) and the flag and variable that move it."""
    seen: dict[int, Listen] = {}
    for item in wanted:
        if item.port in seen:
            raise ConfigError(
                f"port {item.port} is asked for by both the {seen[item.port].component} and the {item.component}: "
                f"move one with {item.flag} or {item.env}"
            )
        seen[item.port] = item
        if not free(item.host, item.port):
            raise ConfigError(
                f"port {item.port} ({item.component}) is already in use: stop what listens there, "
                f"or pick another port with {item.flag} or {item.env}"
            )

"""Pure rendering of the local brokers' server.properties (one node or a cluster), log4j2 config and cluster id."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

NODE_ID = 1
HOST = "127.0.0.1"


def new_cluster_id() -> str:
    """A Kafka cluster id: a random UUID as 22 characters of unpadded URL-safe base64, not starting with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if is_valid_cluster_id(cluster_id):
            return cluster_id


def is_valid_cluster_id(text: str) -> bool:
    """Whether ``text`` is the kind of id StorageTool accepts (16 bytes, URL-safe base64) and can pass as an
    argument (a leading '-' reads as an option to its command line parser)."""
    if len(text) != 22 or text.startswith("-"):
        return False
    try:
        return len(base64.urlsafe_b64decode(text + "==")) == 16
    except ValueError:
        return False


def cluster_replication(nodes: int) -> tuple[int, int]:
    """Replication factor and min.insync.replicas of a local cluster's internal topics: 3/2 from three nodes on."""
    if nodes < 1:
        raise ValueError(f"a cluster needs at least one node, got {nodes}")
    replicas = min(nodes, 3)
    return replicas, max(1, replicas - 1)


def server_properties(
    *,
    port: int,
    controller_port: int,
    data_dir: Path,
    num_partitions: int = 1,
    extra: Mapping[str, str] | None = None,
    node_id: int = NODE_ID,
    voters: Mapping[int, int] | None = None,
) -> dict[str, str]:
    """Every key of a KRaft broker+controller on 127.0.0.1: a single node, or node ``node_id`` of ``voters``.

    ``voters`` maps each node id of the quorum to its controller port (default: this node alone).
    """
    quorum = dict(voters) if voters else {node_id: controller_port}
    if quorum.get(node_id) != controller_port:
        raise ValueError(f"node {node_id} must be a voter on its controller port {controller_port}")
    if port in quorum.values():
        raise ValueError("the broker and controller ports must differ")
    ports = [("port", port)]
    ports += [("controller_port" if n == node_id else f"controller_port of node {n}", p) for n, p in quorum.items()]
    for name, value in ports:
        if not 0 < value < 65536:
            raise ValueError(f"{name} must be in 1..65535, got {value}")
    if len(set(quorum.values())) != len(quorum):
        raise ValueError(f"controller ports must differ: {quorum}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    replicas, min_isr = (str(n) for n in cluster_replication(len(quorum)))
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        # Static voters (kraft.version 0) keep no endpoints in the metadata log, so the
        # controller ports may change between restarts of the data dirs (all nodes at once).
        "controller.quorum.voters": ",".join(f"{n}@{HOST}:{p}" for n, p in sorted(quorum.items())),
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir / "logs"),
        "num.partitions": str(num_partitions),
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": "0",
        # The default (128 MB) is allocated on the heap at start.
        "log.cleaner.dedupe.buffer.size": str(4 * 1024 * 1024),
        "auto.create.topics.enable": "false",
        # After a crash the restarted broker cannot register until the old registration's session expires
        # (default 9 s); heartbeats stay on loopback, so a shorter session is safe.
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "background.threads": "4",
    }
    if len(quorum) > 1:
        # The command stops every node at once: a controlled shutdown would wait for a controller quorum that the
        # other nodes have just taken down with them (30 s, then SIGKILL). A killed node never shuts down anyway.
        props["controlled.shutdown.enable"] = "false"
    props.update(extra or {})
    return props


def render_properties(props: Mapping[str, str]) -> str:
    """Java .properties text, one ``key=value`` a line, keys in the given order."""
    lines = ["# Written by tokenrelay's local broker runner at every start; edits are overwritten."]
    for key, value in props.items():
        lines.append(f"{_escape_properties(key, is_key=True)}={_escape_properties(value, is_key=False)}")
    return "\n".join(lines) + "\n"


def render_server_properties(
    *,
    port: int,
    controller_port: int,
    data_dir: Path,
    num_partitions: int = 1,
    extra: Mapping[str, str] | None = None,
    node_id: int = NODE_ID,
    voters: Mapping[int, int] | None = None,
) -> str:
    """server.properties text for a KRaft broker; see ``server_properties``."""
    return render_properties(
        server_properties(
            port=port,
            controller_port=controller_port,
            data_dir=data_dir,
            num_partitions=num_partitions,
            extra=extra,
            node_id=node_id,
            voters=voters,
        )
    )


def parse_properties(text: str) -> dict[str, str]:
    """Read back the simple ``key=value`` subset that ``render_properties`` writes."""
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, value = _split_key_value(line)
        props[_unescape_properties(key)] = _unescape_properties(value)
    return props


def render_log4j2_xml(log_file: Path, *, max_file_mb: int = 20, max_files: int = 3) -> str:
    """log4j2 XML: WARN and above to the console, INFO and above to a rolling file."""
    path = escape(str(log_file), {'"': "&quot;"})
    pattern = "[%d] %p %m (%c)%n"
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN" shutdownHook="disable">
  <Appenders>
    <Console name="console" target="SYSTEM_ERR">
      <ThresholdFilter level="WARN" onMatch="ACCEPT" onMismatch="DENY"/>
      <PatternLayout pattern="kafka: {pattern}"/>
    </Console>
    <RollingFile name="file" fileName="{path}" filePattern="{path}.%i">
      <PatternLayout pattern="{pattern}"/>
      <Policies>
        <SizeBasedTriggeringPolicy size="{max_file_mb} MB"/>
      </Policies>
      <DefaultRolloverStrategy max="{max_files}"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="kafka.authorizer.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <!-- Routine warnings (controller activation at every start, double close at shutdown): file only. -->
    <Logger name="org.apache.kafka.controller.QuorumController" level="INFO" additivity="false">
      <AppenderRef ref="file"/>
    </Logger>
    <Logger name="org.apache.kafka.clients.NetworkClient" level="WARN" additivity="false">
      <AppenderRef ref="file"/>
    </Logger>
    <!-- A cluster node that restarts or stops with the others: requests that reach a controller between elections,
         and a Raft client that cannot say goodbye to a quorum already gone. File only. -->
    <Logger name="kafka.server.ControllerApis" level="INFO" additivity="false">
      <AppenderRef ref="file"/>
    </Logger>
    <Logger name="org.apache.kafka.raft" level="INFO" additivity="false">
      <AppenderRef ref="file"/>
    </Logger>
    <!-- Followers losing a leader that died or stopped: routine in a cluster, file only. -->
    <Logger name="kafka.server.ReplicaFetcherThread" level="INFO" additivity="false">
      <AppenderRef ref="file"/>
    </Logger>
    <Root level="INFO">
      <AppenderRef ref="console"/>
      <AppenderRef ref="file"/>
    </Root>
  </Loggers>
</Configuration>
"""


def _escape_properties(text: str, *, is_key: bool) -> str:
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif is_key and ch in "=: ":
            out.append("\\" + ch)
        elif ord(ch) > 0x7E:
            # Kafka loads properties as ISO-8859-1; escape UTF-16 code units (surrogate pairs beyond the BMP).
            units = ch.encode("utf-16-be")
            out.extend(f"\\u{int.from_bytes(units[j : j + 2], 'big'):04x}" for j in range(0, len(units), 2))
        else:
            out.append(ch)
    return "".join(out)


def _split_key_value(line: str) -> tuple[str, str]:
    i = 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] in "=:":
            return line[:i].rstrip(), line[i + 1 :].lstrip()
        i += 1
    return line, ""


def _unescape_properties(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "u" and i + 5 < len(text):
                out.append(chr(int(text[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out).encode("utf-16-be", "surrogatepass").decode("utf-16-be")

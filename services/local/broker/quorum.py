"""Which node of a KRaft cluster is the active controller: a DescribeQuorum request (KIP-595), on the raw socket."""

from __future__ import annotations

import struct

from schemas.varint import decode_uvarint, encode_uvarint
from services.local.broker.runner import kafka_round_trip

DESCRIBE_QUORUM = 55
METADATA_TOPIC = "__cluster_metadata"


def describe_quorum_request(correlation_id: int, client_id: bytes = b"tokenrelay-quorum") -> bytes:
    """A size-prefixed DescribeQuorum v0 request for partition 0 of the metadata topic (flexible, header v2)."""
    header = struct.pack(">hhih", DESCRIBE_QUORUM, 0, correlation_id, len(client_id)) + client_id + b"\x00"
    topic = METADATA_TOPIC.encode()
    # topics: compact array of 1; name: compact string; partitions: compact array of 1; tagged fields empty.
    body = (
        b"\x02" + encode_uvarint(len(topic) + 1) + topic + b"\x02" + struct.pack(">i", 0) + b"\x00" + b"\x00" + b"\x00"
    )
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def leader_from_response(body: bytes, correlation_id: int) -> int | None:
    """The quorum leader's node id in a DescribeQuorum v0 response body (None on an error or a mismatch)."""
    try:
        got, pos = struct.unpack_from(">i", body, 0)[0], 4
        if got != correlation_id:
            return None
        pos = _skip_tagged(body, pos)
        (error,) = struct.unpack_from(">h", body, pos)
        pos += 2
        topics, pos = _uvarint_at(body, pos)
        if error != 0 or topics < 2:
            return None
        name_len, pos = _uvarint_at(body, pos)
        pos += name_len - 1
        partitions, pos = _uvarint_at(body, pos)
        if partitions < 2:
            return None
        _index, p_error, leader = struct.unpack_from(">ihi", body, pos)
    except (struct.error, IndexError):
        return None
    return leader if p_error == 0 and leader >= 0 else None


def active_controller(host: str, port: int, timeout_s: float = 5.0) -> int | None:
    """Node id of the active controller, asked of the broker at host:port (which forwards to the quorum)."""
    body = kafka_round_trip(host, port, describe_quorum_request(correlation_id=7), timeout_s)
    return None if body is None else leader_from_response(body, correlation_id=7)


def _uvarint_at(data: bytes, pos: int) -> tuple[int, int]:
    read = decode_uvarint(data, pos)
    if read is None:
        raise struct.error("truncated varint")
    return read


def _skip_tagged(data: bytes, pos: int) -> int:
    count, pos = _uvarint_at(data, pos)
    for _ in range(count):
        _tag, pos = _uvarint_at(data, pos)
        size, pos = _uvarint_at(data, pos)
        pos += size
    return pos

"""The pure partitioner agrees with aiokafka's (the Java client's) murmur2."""

from __future__ import annotations

from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from schemas.ids import new_request_id
from schemas.partitioning import murmur2, partition_for_key


@given(st.binary(max_size=64))
def test_murmur2_matches_the_java_client(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


def test_partition_for_key_matches_the_default_partitioner() -> None:
    for _ in range(200):
        rid = new_request_id()
        expected = (aiokafka_murmur2(rid.encode()) & 0x7FFFFFFF) % 8
        assert partition_for_key(rid, 8) == expected

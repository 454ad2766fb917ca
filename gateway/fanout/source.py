"""Where the relay reads token events: the events topic's records, from Kafka or from a unit test's lists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SourceRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: Sequence[tuple[str, bytes]] = ()


class Record(Protocol):
    """One record of the events topic as the relay reads it (a SourceRecord, or aiokafka's ConsumerRecord as is)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class EventSource(Protocol):
    """Where the relay reads token events: the Kafka events topic, or a list in unit tests."""

    partitions: int

    async def start(self) -> tuple[dict[int, int], int]:
        """Start reading; returns the next offset per partition and the broker time reading started at."""
        ...

    async def poll(self) -> Sequence[Record]:
        """Next records in offset order per partition; waits a little when there are none."""
        ...

    async def replay(self, partition: int, from_time_ms: int, stop_offset: int, key: bytes) -> list[SourceRecord]:
        """Records with this key from the first with timestamp >= from_time_ms up to stop_offset (excluded)."""
        ...

    async def log_start(self, partition: int) -> int:
        """Oldest offset still retained in the partition."""
        ...

    async def log_end(self, partition: int) -> int:
        """Offset the next record written to the partition will get."""
        ...

    async def stop(self) -> None: ...

"""The gateways' consumer group on the events topic: each reads only the partitions assigned to it.

Discovery rides on the group protocol itself: every gateway puts its advertised URL (and what it reads now) in its
join metadata, and the leader's assignment hands every member the whole partition -> URL map of the new generation.
No extra topic, no heartbeats of our own: the map changes exactly when ownership does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.structs import ConsumerRecord

from gateway.cluster.owners import (
    Member,
    Owners,
    decode_map,
    decode_member,
    encode_map,
    encode_member,
    owner_urls,
    sticky_assign,
)
from services.kafka import make_consumer, map_kafka_errors, start_client
from services.settings import Settings

log = logging.getLogger(__name__)

# (partitions gained with their start offsets, partitions lost, wall time reading the gained ones began)
Reassign = Callable[[dict[int, int], set[int], int], None]


class GatewayAssignor:
    """aiokafka partition assignor (duck-typed): sticky, balanced, and carrying the owners' URLs."""

    name = "tokenrelay-gateways"
    version = 0

    def __init__(self, url: str, owned: Callable[[], Iterable[int]]):
        self.url = url
        self.owned = owned
        self.received: dict[int, str] = {}

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        member = Member(self.url, tuple(sorted(self.owned())))
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), encode_member(member))

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        decoded = {mid: decode_member(meta.user_data) for mid, meta in members.items()}
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        plans: dict[str, list[tuple[str, list[int]]]] = {mid: [] for mid in members}
        urls: dict[int, str] = {}
        for topic in topics:
            plan = sticky_assign(cluster.partitions_for_topic(topic) or (), decoded)
            urls.update(owner_urls(plan, decoded))
            for mid, parts in plan.items():
                plans[mid].append((topic, parts))
        blob = encode_map(urls)
        return {mid: ConsumerProtocolMemberAssignment(self.version, plan, blob) for mid, plan in plans.items()}

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.received = decode_map(assignment.user_data)


class GroupReader(ConsumerRebalanceListener):
    """Reads the events partitions the group assigns to this gateway, from their end when newly assigned."""

    def __init__(self, settings: Settings, owners: Owners):
        self.settings = settings
        self.topic = settings.events_topic
        self.owners = owners
        self.next: dict[int, int] = {}  # next offset to read per owned partition
        self.on_reassign: Reassign | None = None
        self.assignor = GatewayAssignor(owners.me, lambda: self.next)
        self._consumer: AIOKafkaConsumer | None = None
        self._first: asyncio.Future[tuple[dict[int, int], int]] | None = None

    async def start(self) -> tuple[dict[int, int], int]:
        """Join the group; returns the first assignment (start offset per partition) and when reading began."""
        consumer = make_consumer(
            self.settings,
            group_id=self.settings.gateway_group,
            partition_assignment_strategy=(self.assignor,),
            session_timeout_ms=self.settings.gateway_session_timeout_ms,
            heartbeat_interval_ms=max(100, self.settings.gateway_session_timeout_ms // 6),
            max_partition_fetch_bytes=4 << 20,
            # The broker answers a fetch as soon as any record is there: the wait only bounds idle polling.
            fetch_max_wait_ms=500,
        )
        await start_client(consumer)
        self._consumer = consumer
        self._first = asyncio.get_running_loop().create_future()
        consumer.subscribe([self.topic], listener=self)
        return await self._first

    async def poll(self) -> list[ConsumerRecord[bytes, bytes]]:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
        out: list[ConsumerRecord[bytes, bytes]] = []
        for tp, records in batches.items():
            if records and tp.partition in self.next:
                self.next[tp.partition] = records[-1].offset + 1
                out += records
        return out

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass  # acted on at the next assignment: a partition this gateway keeps is read on without a gap

    async def on_partitions_assigned(self, assigned: Any) -> None:
        assert self._consumer is not None
        owned = {tp.partition for tp in assigned if tp.topic == self.topic}
        lost = set(self.next) - owned
        gained = owned - set(self.next)
        for p in lost:
            del self.next[p]
        since_ms = int(time.time() * 1000)
        if gained:
            tps = [TopicPartition(self.topic, p) for p in gained]
            with map_kafka_errors("cannot read the events topic's end"):
                ends = await self._consumer.end_offsets(tps)
            for tp in tps:
                self.next[tp.partition] = ends[tp]
        for p, offset in self.next.items():
            self._consumer.seek(TopicPartition(self.topic, p), offset)
        log.info("gateway reads events partitions %s (gained %s, lost %s)", sorted(owned), sorted(gained), sorted(lost))
        if self._first is not None and not self._first.done():
            self._first.set_result((dict(self.next), since_ms))
        elif self.on_reassign is not None:
            self.on_reassign({p: self.next[p] for p in gained}, lost, since_ms)
        # The map goes out after the relay took its partitions: whoever reads it finds the owner ready.
        self.owners.update(self.assignor.received)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

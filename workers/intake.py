"""Request intake: per-partition commit tracking and the dead-letter path for unusable requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka.structs import ConsumerRecord

from schemas.errors import TokenRelayError
from services.settings import Settings
from workers.publisher import Publisher

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OffsetTracker:
    """Offsets of one partition taken but not finished; the committable offset is the lowest one still open."""

    next_offset: int | None = None
    open: set[int] = field(default_factory=set)

    def take(self, offset: int) -> None:
        self.open.add(offset)
        self.next_offset = max(offset + 1, self.next_offset or 0)

    def done(self, offset: int) -> None:
        self.open.discard(offset)

    def committable(self) -> int | None:
        """Offset to commit (the next record to read after a restart), or None when nothing was taken."""
        if self.open:
            return min(self.open)
        return self.next_offset


def owned(current: OffsetTracker | None, lease: object, offset: int) -> bool:
    """Whether a request taken under ``lease`` (the tracker of its partition then) at ``offset`` is still this
    worker's: the partition is held under that same assignment and the offset is open. A partition revoked and
    assigned here again has a new tracker, and may hold the same offset again: a ticket of the earlier assignment is
    then not owned (the new assignment's ticket runs the request), nor may it close the new one's offset."""
    return current is not None and current is lease and offset in current.open


async def dead_letter(
    publisher: Publisher, settings: Settings, record: ConsumerRecord[bytes, bytes], error: TokenRelayError
) -> None:
    """Copy an unusable request, byte for byte, to the DLQ with why; returns once the broker has it."""
    headers = [
        ("error", error.message.encode("utf-8", "replace")[:1000]),
        ("error-code", error.code.encode()),
        ("original-topic", record.topic.encode()),
        ("original-partition", str(record.partition).encode()),
        ("original-offset", str(record.offset).encode()),
    ]
    await publisher.send(settings.dlq_topic, record.key or b"", record.value or b"", headers)
    log.warning(
        "request at %s[%d]@%d sent to the DLQ: %s", record.topic, record.partition, record.offset, error.message
    )

"""The one boundary for aiokafka's errors, and the retry-on-start loop, without a broker."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, NotLeaderForPartitionError, UnknownError

from schemas.errors import KafkaUnavailable, RecordTooLarge
from services.kafka import map_kafka_errors, start_client


def test_aiokafka_errors_become_kafka_unavailable_with_their_retriable_flag() -> None:
    with pytest.raises(KafkaUnavailable) as caught, map_kafka_errors("cannot produce"):
        raise NotLeaderForPartitionError()
    assert caught.value.retriable and caught.value.message.startswith("cannot produce: ")
    assert isinstance(caught.value.__cause__, NotLeaderForPartitionError)
    with pytest.raises(KafkaUnavailable) as caught, map_kafka_errors("cannot produce"):
        raise UnknownError()
    assert not caught.value.retriable
    with pytest.raises(KafkaUnavailable, match="timed out"), map_kafka_errors("cannot replay"):
        raise TimeoutError
    with pytest.raises(ValueError), map_kafka_errors("unrelated"):
        raise ValueError("not Kafka's")


def test_a_record_too_large_is_a_permanent_413_not_a_retriable_503() -> None:
    with pytest.raises(RecordTooLarge) as caught, map_kafka_errors("cannot produce the request"):
        raise MessageSizeTooLargeError("The message is 1200000 bytes when serialized")
    error = caught.value
    assert (error.http_status, error.code, error.retriable) == (413, "record_too_large", False)
    assert "Retry-After" not in error.headers()


class Flaky:
    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        if self.errors:
            raise self.errors.pop(0)


async def test_start_retries_only_while_the_cluster_is_unreachable() -> None:
    client = Flaky(KafkaConnectionError("refused"))
    await start_client(client, timeout_s=30)
    assert client.starts == 2
    broken = Flaky(UnknownError())
    with pytest.raises(KafkaUnavailable):
        await start_client(broken, timeout_s=30)
    assert broken.starts == 1
    gone = Flaky(*(KafkaConnectionError("refused") for _ in range(10)))
    with pytest.raises(KafkaUnavailable, match="not reachable"):
        await start_client(gone, timeout_s=0)
    assert gone.starts == 1

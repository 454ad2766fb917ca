"""A quixstreams application, run by its own venv's Python: completion tokens per request from the token log.

Knows nothing of tokenrelay: the broker, the registry URL and the topic come as arguments. Prints one JSON
object: request id -> {"delta_tokens": tokens counted from Delta events, "usage": the Finished usage}.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

from quixstreams import Application
from quixstreams.models.serializers.avro import AvroDeserializer, SchemaRegistryClientConfig


def main() -> None:
    bootstrap, registry, topic, *request_ids = sys.argv[1:]
    wanted = set(request_ids)
    counts: dict[str, dict[str, Any]] = {rid: {"delta_tokens": 0, "usage": None} for rid in wanted}
    app = Application(
        broker_address=bootstrap,
        consumer_group=f"quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        use_changelog_topics=False,
        auto_create_topics=False,
    )
    deserializer = AvroDeserializer(schema_registry_client_config=SchemaRegistryClientConfig(url=registry))
    events = app.topic(topic, value_deserializer=deserializer)

    def count(event: dict[str, Any]) -> None:
        rid, payload = event["request_id"], event["payload"]
        if rid not in wanted:
            return
        if "token_ids" in payload:
            counts[rid]["delta_tokens"] += len(payload["token_ids"])
        elif "finish_reason" in payload:
            counts[rid]["usage"] = payload["usage"]["completion_tokens"]
        if all(c["usage"] is not None for c in counts.values()):
            app.stop()

    app.dataframe(events).update(count)
    app.run()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()

"""Fan-out of the events log to SSE subscribers: the hub, its history and backfills, cursors, SSE framing."""

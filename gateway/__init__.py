"""The aiohttp gateway: submit APIs, SSE fan-out hub, replay, playground page."""

"""The Batch API's running parts in one gateway: the store it reads and writes, and the drivers of its batches."""

from __future__ import annotations

from aiohttp import web

from gateway.api.context import Gateway
from gateway.batch.driver import Drivers
from gateway.batch.store import BatchStore


class BatchService:
    def __init__(self, gw: Gateway):
        self.store = BatchStore(gw.settings, gw.producer)
        self.drivers = Drivers(gw, self.store)

    async def start(self) -> None:
        await self.store.start()
        self.drivers.start()

    async def stop(self) -> None:
        await self.drivers.stop()
        await self.store.stop()


BATCH = web.AppKey("batch", BatchService)


def service_of(request: web.Request) -> BatchService:
    return request.app[BATCH]

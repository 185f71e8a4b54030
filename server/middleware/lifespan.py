"""Per-worker start and stop: attach to the engine, detach on shutdown."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class EngineLifespan:
    def __init__(self, engine_client):
        self.engine_client = engine_client

    async def process_startup(self, scope, event) -> None:
        await self.engine_client.start()
        log.info("worker attached to the engine")

    async def process_shutdown(self, scope, event) -> None:
        await self.engine_client.close()

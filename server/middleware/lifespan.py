"""Per-worker start and stop: attach to the engine and warm up, detach on shutdown."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class EngineLifespan:
    def __init__(self, engine_client, warm_up):
        self.engine_client = engine_client
        self.warm_up = warm_up  # work a first request would otherwise pay for

    async def process_startup(self, scope, event) -> None:
        await self.engine_client.start()
        self.warm_up()
        log.info("worker attached to the engine")

    async def process_shutdown(self, scope, event) -> None:
        await self.engine_client.close()

"""GET /version and GET /openapi.json."""

from __future__ import annotations

import dfastllm
from server.openapi import openapi_document


class Version:
    async def on_get(self, req, resp) -> None:
        resp.media = {"version": dfastllm.__version__, "api_versions": list(dfastllm.API_VERSIONS)}


class OpenApi:
    def __init__(self, state):
        self.document = openapi_document(state.config, state.limits())

    async def on_get(self, req, resp) -> None:
        resp.media = self.document

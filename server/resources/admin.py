"""GET and PATCH /admin/config: the runtime-tunable settings (admin key
only; `ApiKeyAuth` refuses other keys with 403 and no key with 401).

PATCH takes a JSON object of runtime fields. It is validated as a whole
with `ServerConfig.updated` (400, and nothing changes, if any value is
invalid), published to every worker and the engine through the control
block, and audit-logged with the values before and after.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, create_model

from dfastllm.config import ServerConfig
from server.errors import InvalidRequest, clip
from server.middleware.channel import read_body
from server.middleware.runtime_config import changed_fields


def _settings_model(name: str, *, optional: bool) -> type[BaseModel]:
    """The runtime fields of ServerConfig as a pydantic model (for the OpenAPI document)."""
    hints = typing.get_type_hints(ServerConfig)
    fields = {}
    for f in dataclasses.fields(ServerConfig):
        if f.metadata["runtime"]:
            # A PATCH may leave any field out, but may not send null.
            fields[f.name] = (hints[f.name], Field(None if optional else ..., description=f.metadata["help"]))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


RuntimeSettings = _settings_model("RuntimeSettings", optional=False)
RuntimeSettingsPatch = _settings_model("RuntimeSettingsPatch", optional=True)


class AdminConfigResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    object: Literal["config"]
    version: int  # of the shared configuration blob; each change adds one
    config: RuntimeSettings


class AdminConfig:
    def __init__(self, shared_config, request_log):
        self.shared = shared_config
        self.request_log = request_log

    async def on_get(self, req, resp) -> None:
        resp.media = self._body()

    async def on_patch(self, req, resp) -> None:
        changes = _parse_changes(await read_body(req))
        try:
            before, after = self.shared.update(changes)
        except ValueError as error:
            message = str(error)
            param = message.split(" ", 1)[0]
            raise InvalidRequest(clip(message, 200), param=param if param in changes else None) from None
        old, new = changed_fields(before, after)
        self.request_log.admin_action(req, "config_update", before=old, after=new,
                                      config_version=self.shared.version)
        resp.media = self._body()

    def _body(self) -> dict:
        return {"object": "config", "version": self.shared.version, "config": self.shared.runtime_settings()}


def _parse_changes(body: bytes) -> dict:
    try:
        changes = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(changes, dict) or not changes:
        raise InvalidRequest("The body must be a JSON object of settings to change, e.g. {\"max_queue\": 64}.")
    tunable = ServerConfig.runtime_fields()
    for name in changes:
        if name not in tunable:
            raise InvalidRequest(f"{clip(name)!r} is not a runtime-tunable setting; tunable: {', '.join(tunable)}.",
                                 param=clip(name), code="unknown_parameter")
    return changes

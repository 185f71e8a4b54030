"""GET and PATCH /admin/config: the runtime-tunable settings (admin key
only; `ApiKeyAuth` refuses other keys with 403 and no key with 401).

PATCH takes a JSON object of runtime fields, validated by its pydantic model
`RuntimeSettingsPatch` (types, bounds and choices from `ServerConfig`; 400
naming the field, and nothing changes, if any value is invalid), published
to every worker and the engine through the control block, and audit-logged
with the values before and after.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError

from dfastllm.config import INT_MAX, LOWER_BOUNDS, ServerConfig
from server.middleware.channel import read_body
from server.middleware.runtime_config import changed_fields
from server.schemas import INTEGRAL, parse


def _settings_model(name: str, base: type[BaseModel], *, optional: bool) -> type[BaseModel]:
    """The runtime fields of ServerConfig as a pydantic model, with the
    bounds and choices `ServerConfig.validate` checks."""
    hints = typing.get_type_hints(ServerConfig)
    fields = {}
    for f in dataclasses.fields(ServerConfig):
        if not f.metadata["runtime"]:
            continue
        kind = Literal[tuple(f.metadata["choices"])] if f.metadata["choices"] else hints[f.name]
        bound, exclusive = LOWER_BOUNDS.get(f.name, (None, False))
        kind = Annotated[kind, Field(gt=bound) if exclusive else Field(ge=bound)]
        if hints[f.name] is int:
            kind = Annotated[kind, Field(le=INT_MAX), INTEGRAL]
        if hints[f.name] is float:
            kind = Annotated[kind, Field(allow_inf_nan=False)]
        # A PATCH may leave any field out, but may not send null.
        fields[f.name] = (kind, Field(None if optional else ..., description=f.metadata["help"]))
    return create_model(name, __base__=base, **fields)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _SettingsChange(_Settings):
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    @model_validator(mode="after")
    def _something(self):
        if not self.model_fields_set:
            raise PydanticCustomError("invalid_value", "The body must be a JSON object of settings to change, "
                                      "e.g. {example}.", {"example": '{"max_queue": 64}'})
        return self

    def changes(self) -> dict:
        return self.model_dump(exclude_unset=True)


RuntimeSettings = _settings_model("RuntimeSettings", _Settings, optional=False)
RuntimeSettingsPatch = _settings_model("RuntimeSettingsPatch", _SettingsChange, optional=True)


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
        changes = parse(RuntimeSettingsPatch, await read_body(req)).changes()
        before, after = self.shared.update(changes)
        old, new = changed_fields(before, after)
        self.request_log.admin_action(req, "config_update", before=old, after=new,
                                      config_version=self.shared.version)
        resp.media = self._body()

    def _body(self) -> dict:
        return {"object": "config", "version": self.shared.version, "config": self.shared.runtime_settings()}

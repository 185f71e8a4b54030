"""Runtime-tunable settings, shared by every process through the control
block's configuration blob.

PATCH /admin/config (on any worker) validates the change with
`ServerConfig.updated`, writes the whole configuration into the blob and
applies it in its own worker. The engine follows the blob in its loop;
every other worker checks the blob's version at the start of each request
(one shared-memory load) and, when it moved, applies the blob's runtime
fields: `state.config` is replaced as a whole (the rate limit, the
load-shedding limits and the diffusion defaults are read from it per
request) and the log level is set. Only runtime fields are taken from the
blob, so it can never change anything else in a worker (keys, limits of
the request schema).

Two PATCHes at the same instant on two workers: the later write wins
whole, so one of the two changes may be lost (admin changes are rare and
each is audit-logged with what it set).
"""

from __future__ import annotations

import dataclasses
import logging

from dfastllm.config import ServerConfig
from dfastllm.log import set_log_level

log = logging.getLogger(__name__)


class SharedConfig:
    def __init__(self, state, control=None):
        """`control` is the engine's ControlBlock; None for an in-process
        engine (the settings then live in this worker only)."""
        self.state = state
        self.control = control
        self.version = control.config_version if control is not None else 0

    def refresh(self) -> None:
        """Apply the blob if another process changed it since we looked."""
        if self.control is None or self.control.config_version == self.version:
            return
        version, blob = self.control.read_config()
        self.version = version
        try:
            shared = ServerConfig.from_json(blob.decode())
            config = self.state.config.updated({name: getattr(shared, name) for name in ServerConfig.runtime_fields()})
        except (ValueError, TypeError) as error:
            log.error("ignoring an unreadable configuration update: %s", error)
            return
        self._apply(config)
        log.info("configuration updated", extra={"config_version": version})

    def update(self, changes: dict) -> tuple[ServerConfig, ServerConfig]:
        """Validate and publish `changes` (runtime fields only); returns
        (before, after). ValueError, and nothing changes, if one is invalid."""
        self.refresh()  # build on the newest settings, whoever wrote them
        before = self.state.config
        after = before.updated(changes)
        if self.control is not None:
            self.version = self.control.write_config(after.to_json().encode())
            self.control.doorbell.ring()  # an idle engine applies it now, not after its sleep
        self._apply(after)
        return before, after

    def runtime_settings(self) -> dict:
        return {name: getattr(self.state.config, name) for name in ServerConfig.runtime_fields()}

    def _apply(self, config: ServerConfig) -> None:
        if config.log_level != self.state.config.log_level:
            set_log_level(config.log_level)
        self.state.config = config


class ConfigRefresh:
    """Falcon middleware: every request sees the current settings."""

    def __init__(self, shared: SharedConfig):
        self.shared = shared

    async def process_request(self, req, resp) -> None:
        self.shared.refresh()


def changed_fields(before: ServerConfig, after: ServerConfig) -> tuple[dict, dict]:
    """The fields that differ: ({name: old}, {name: new})."""
    names = [f.name for f in dataclasses.fields(ServerConfig) if getattr(before, f.name) != getattr(after, f.name)]
    return {n: getattr(before, n) for n in names}, {n: getattr(after, n) for n in names}

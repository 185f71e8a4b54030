"""Shared-memory IPC between the HTTP workers and the engine (torch-free).

One run uses 1 + 2N segments under one base name, passed to every process
in the environment (`DFASTLLM_IPC_NAME`):

    <base>-ctl       the control block (dfastllm.ipc.control)
    <base>-req<i>    worker slot i -> engine (SUBMIT, CANCEL)
    <base>-rsp<i>    engine -> worker slot i (TOKENS, FINISHED, ...)

The supervisor creates and unlinks them (`IpcLayout.create`, `.unlink`,
`remove_stale_segments` at start and stop); the engine and the workers
attach (`IpcLayout.attach`). A supervisor killed outright cannot unlink:
its direct children do as they exit (`remove_run_segments`). A worker claims a slot (`claim_worker_slot`);
the engine serves every claimed slot (`dfastllm.ipc.channels`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets

from dfastllm._ipc import Segment
from dfastllm.ipc.control import ControlBlock, EngineState, SlotInfo, SlotState, pid_alive
from dfastllm.ipc.ring import Ring

__all__ = ["ENV_NAME", "ControlBlock", "EngineState", "IpcLayout", "Ring", "WorkerEndpoint", "new_base_name",
           "remove_run_segments", "remove_stale_segments"]

ENV_NAME = "DFASTLLM_IPC_NAME"
DEFAULT_PREFIX = "dfastllm"
DEFAULT_RING_CAPACITY = 1 << 20
_SHM_DIR = "/dev/shm"
_BASE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


def new_base_name(prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix>-<pid>-<random>`: the pid lets `remove_stale_segments` tell
    a crashed run's leftovers from a live run's segments."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_segments(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Unlink segments named `<prefix>-<pid>-...` whose creating process is
    gone (a crashed run); live runs' segments, and names without a pid,
    are left alone. Returns the names removed."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)-")

    def orphaned(name: str) -> bool:
        match = pattern.match(name)
        return bool(match) and not pid_alive(int(match.group(1)))

    return _unlink_segments(orphaned)


def remove_run_segments(base_name: str) -> list[str]:
    """Unlink every segment of the run named `base_name` (the layout's and
    any other `<base>-...`, such as the rate-limit table); -> the names removed."""
    _check_base_name(base_name)
    return _unlink_segments(lambda name: name.startswith(base_name + "-"))


def _unlink_segments(chosen) -> list[str]:
    """Unlink the segments whose name `chosen(name)` picks; -> the names removed."""
    removed = []
    for name in sorted(os.listdir(_SHM_DIR)):
        if chosen(name):
            try:
                os.unlink(os.path.join(_SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass  # another process got there first
    return removed


@dataclasses.dataclass
class WorkerEndpoint:
    """A worker's claimed slot: it puts into `requests` and reads `responses`."""

    layout: IpcLayout
    slot: int
    generation: int
    requests: Ring
    responses: Ring

    def release(self) -> bool:
        """Give the slot back (the engine cancels what is still open)."""
        return self.layout.control.release_slot(self.slot, self.generation)


class IpcLayout:
    def __init__(self, base_name: str, control: ControlBlock, rings: dict[str, Ring] | None = None):
        self.base_name = base_name
        self.control = control
        self.n_slots = control.n_slots
        self._rings = rings or {}

    @classmethod
    def create(cls, base_name: str, n_slots: int, *, ring_capacity: int = DEFAULT_RING_CAPACITY,
               config: bytes = b"") -> IpcLayout:
        """Create every segment (supervisor). On any failure, those already
        created are unlinked again."""
        _check_base_name(base_name)
        created: list[str] = []
        try:
            control = ControlBlock.create(_control_name(base_name), n_slots)
            created.append(control.name)
            if config:
                control.write_config(config)
            rings = {}
            for slot in range(n_slots):
                for name in (_request_name(base_name, slot), _response_name(base_name, slot)):
                    rings[name] = Ring.create(name, ring_capacity)
                    created.append(name)
        except BaseException:
            for name in created:
                Segment.unlink(name)
            raise
        return cls(base_name, control, rings)

    @classmethod
    def attach(cls, base_name: str | None = None) -> IpcLayout:
        """Attach to a run (engine, worker); the base name defaults to
        $DFASTLLM_IPC_NAME. Rings are mapped on first use."""
        if base_name is None:
            base_name = os.environ.get(ENV_NAME)
            if not base_name:
                raise RuntimeError(f"${ENV_NAME} is not set: start the server with `dfastllm serve`")
        _check_base_name(base_name)
        return cls(base_name, ControlBlock.attach(_control_name(base_name)))

    def env(self) -> dict[str, str]:
        """What a child process needs to attach."""
        return {ENV_NAME: self.base_name}

    def request_ring(self, slot: int) -> Ring:
        """Worker `slot`'s ring to the engine; its puts ring the engine's doorbell."""
        ring = self._ring(_request_name(self.base_name, self._check_slot(slot)))
        ring.set_doorbell(self.control.doorbell)
        return ring

    def response_ring(self, slot: int) -> Ring:
        return self._ring(_response_name(self.base_name, self._check_slot(slot)))

    def claim_worker_slot(self) -> WorkerEndpoint:
        """Worker attach: claim a free slot (NoFreeSlot if none)."""
        slot, generation = self.control.claim_slot()
        return WorkerEndpoint(self, slot, generation, self.request_ring(slot), self.response_ring(slot))

    def reclaim_slot(self, slot: int, seen: SlotInfo) -> bool:
        """Free a slot whose worker left or died: drop what is left in its
        rings and mark it FREE. Only the engine may call this (or the
        supervisor while no engine runs): it resets both rings. False if the
        slot changed since `seen`."""
        if seen.state != SlotState.RECLAIMING and not self.control.begin_reclaim(slot, seen):
            return False
        self.request_ring(slot).reset()
        self.response_ring(slot).reset()
        self.control.finish_reclaim(slot)
        return True

    def segment_names(self) -> list[str]:
        names = [_control_name(self.base_name)]
        for slot in range(self.n_slots):
            names += [_request_name(self.base_name, slot), _response_name(self.base_name, slot)]
        return names

    def unlink(self) -> None:
        """Remove every name (supervisor, at stop). Mappings stay valid in
        processes that still have them."""
        for name in self.segment_names():
            Segment.unlink(name)

    def _ring(self, name: str) -> Ring:
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = Ring.attach(name)
        return ring

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        return slot


def _check_base_name(base_name: str) -> None:
    if not _BASE_NAME.fullmatch(base_name):
        raise ValueError(f"IPC base name must be 1-200 characters of [A-Za-z0-9._-], got {base_name!r}")


def _control_name(base: str) -> str:
    return f"{base}-ctl"


def _request_name(base: str, slot: int) -> str:
    return f"{base}-req{slot}"


def _response_name(base: str, slot: int) -> str:
    return f"{base}-rsp{slot}"

"""The engine's side of the worker slots: which workers it serves, one
doorbell to sleep on for all of their request rings, and non-blocking
senders for their response rings.

The engine loop, in outline:

    channels = WorkerChannels(layout)
    while running:
        attached, detached = channels.refresh(check_owners=heartbeat_due)
        # detached: cancel the requests of those workers (send nothing back)
        for channel, frame in channels.receive():
            ...decode(frame), admit / cancel...
        ...step, channel.responses.send(encode(msg))...
        channels.flush()
        if idle: channels.wait(timeout=0.25)   # futex sleep, woken by any put
"""

from __future__ import annotations

import dataclasses

from dfastllm.ipc import IpcLayout
from dfastllm.ipc.control import SlotState, pid_alive
from dfastllm.ipc.ring import Ring, RingSender


@dataclasses.dataclass
class Channel:
    """One attached worker as the engine sees it."""

    slot: int
    generation: int
    pid: int
    requests: Ring  # the engine consumes SUBMIT / CANCEL here
    responses: RingSender  # TOKENS, FINISHED, ... never block the engine


class WorkerChannels:
    def __init__(self, layout: IpcLayout):
        self.layout = layout
        self.by_slot: dict[int, Channel] = {}

    def refresh(self, *, check_owners: bool = True) -> tuple[list[Channel], list[Channel]]:
        """Bring the served set in line with the slot table; returns
        (attached, detached). A detached worker left or died: the engine
        must drop its requests. Slots it left behind are reclaimed (rings
        reset, FREE). `check_owners` also probes every owner pid (a few
        syscalls per slot: do it with the heartbeat, not every wake)."""
        attached: list[Channel] = []
        detached: list[Channel] = []
        for slot, info in enumerate(self.layout.control.slots()):
            served = self.by_slot.get(slot)
            owner_dead = info.state == SlotState.CLAIMED and check_owners and not pid_alive(info.pid)
            if served is not None and (info.state != SlotState.CLAIMED or info.generation != served.generation
                                       or owner_dead):
                detached.append(self.by_slot.pop(slot))
                served = None
            if info.state == SlotState.CLAIMED and not owner_dead:
                if served is None:
                    channel = Channel(slot, info.generation, info.pid, self.layout.request_ring(slot),
                                      RingSender(self.layout.response_ring(slot)))
                    self.by_slot[slot] = channel
                    attached.append(channel)
            elif owner_dead or info.state in (SlotState.RELEASED, SlotState.RECLAIMING):
                self.layout.reclaim_slot(slot, info)
        return attached, detached

    def receive(self, max_per_worker: int = 256) -> list[tuple[Channel, bytes]]:
        """Frames waiting in the request rings, in order per worker, at most
        `max_per_worker` from each so one busy worker cannot starve others."""
        frames = []
        for channel in self.by_slot.values():
            for frame in channel.requests.get_many(max_per_worker):
                frames.append((channel, frame))
        return frames

    def wait(self, timeout: float | None) -> bool:
        """Sleep until a request arrives, the doorbell rings (a worker
        claimed or released a slot, the engine state was changed) or the
        timeout passes; True iff a request is waiting."""
        rings = [channel.requests for channel in self.by_slot.values()]
        return self.layout.control.doorbell.wait_any(rings, timeout)

    def flush(self) -> bool:
        """Push response backlogs; True when all are empty."""
        return all([channel.responses.flush() for channel in self.by_slot.values()])

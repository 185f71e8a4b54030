"""The control block: one shared segment every process reads without a
message. The supervisor creates it; the engine publishes its state,
heartbeat and load there; workers claim a slot there at attach; the
runtime-tunable configuration lives there behind a seqlock.

Layout (byte offsets; the hot words written by different processes sit on
different cache lines):

    0    magic, layout version, n_slots, config capacity, creator pid
    64   engine state, engine generation, engine pid
    128  heartbeat (CLOCK_MONOTONIC ns; the engine writes it every HEARTBEAT_INTERVAL_S),
         loop progress (CLOCK_MONOTONIC ns; the engine loop writes it each round)
    192  queue depth, running, device memory used, device memory total,
         circuit state, circuit probe time (CLOCK_MONOTONIC ns)
    256  engine doorbell (every request ring's put rings it)
    320  worker slots, 64 bytes each: one word (generation << 32 | pid << 2 | state)
    ...  configuration blob (seqlock), 64-aligned

A slot is one 64-bit word so that claiming it is one CAS: a reader never
sees CLAIMED with a stale pid or generation.

Slot life: FREE -(worker CAS)-> CLAIMED -(worker leaves)-> RELEASED
-(engine)-> RECLAIMING -> FREE; a CLAIMED slot whose owner died goes to
RECLAIMING too. Only the engine (or the supervisor while no engine runs)
reclaims, because only it may reset the slot's rings.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time

from dfastllm._ipc import SEQLOCK_HEADER_BYTES, Doorbell, Segment

_MAGIC = int.from_bytes(b"DFLLCTL1", "little")
_LAYOUT_VERSION = 1
_HEADER = dict(magic=0, version=8, n_slots=16, config_capacity=24, creator_pid=32)
_STATE, _GENERATION, _ENGINE_PID = 64, 72, 80
_HEARTBEAT, _LOOP_AT = 128, 136
_QUEUE_DEPTH, _RUNNING, _MEM_USED, _MEM_TOTAL = 192, 200, 208, 216
# Zero in a fresh segment, so a block written before these words existed
# reads CLOSED.
_CIRCUIT_STATE, _CIRCUIT_PROBE_AT = 224, 232
_DOORBELL = 256
_SLOTS = 320
_SLOT_BYTES = 64
DEFAULT_CONFIG_CAPACITY = 64 * 1024

# When the engine counts as alive, for everyone who asks: admission (the
# workers' submit), the watch that ends open requests of a dead engine, and
# readiness. The engine process beats from a thread of its own every
# HEARTBEAT_INTERVAL_S whatever its step length; a heartbeat older than
# ENGINE_DEAD_AFTER_S (several beats missed) means the process is dead or
# stopped (kill -9, a crash, SIGSTOP).
HEARTBEAT_INTERVAL_S = 0.1
ENGINE_DEAD_AFTER_S = 0.75


class EngineState(enum.IntEnum):
    LOADING = 0
    WARMING = 1
    READY = 2
    DRAINING = 3
    FAILED = 4
    STOPPED = 5  # no engine process (before the first start, after stop)


class CircuitState(enum.IntEnum):
    """The engine's circuit breaker. OPEN: new requests are refused until
    the probe time; HALF_OPEN: the engine admits one probe request, whose
    success closes the circuit and whose failure opens it again."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class SlotState(enum.IntEnum):
    FREE = 0
    CLAIMED = 1
    RELEASED = 2  # the worker left cleanly; the engine has not cleaned up yet
    RECLAIMING = 3  # the engine is resetting the slot's rings


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    state: SlotState
    pid: int
    generation: int  # bumped at every claim, so a re-claimed slot looks new

    @property
    def word(self) -> int:
        return self.generation << 32 | self.pid << 2 | self.state

    @classmethod
    def from_word(cls, word: int) -> SlotInfo:
        return cls(SlotState(word & 3), (word >> 2) & 0x3FFF_FFFF, word >> 32)


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """What a worker needs for readiness, metrics and load shedding."""

    state: EngineState
    generation: int  # engine restarts so far; a change means in-flight work is lost
    pid: int
    heartbeat_age: float  # seconds since the engine's last heartbeat
    queue_depth: int
    running: int
    device_memory_used: int
    device_memory_total: int
    circuit_state: CircuitState = CircuitState.CLOSED
    circuit_retry_after_s: float = 0.0  # until a half-open probe is allowed; 0 unless OPEN

    @property
    def heartbeat_stale(self) -> bool:
        """The engine process is dead or stopped (ENGINE_DEAD_AFTER_S without a beat)."""
        return self.heartbeat_age > ENGINE_DEAD_AFTER_S


class NoFreeSlot(RuntimeError):
    pass


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state letter follows the parenthesised command name.
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, IndexError):
        return False


class ControlBlock:
    def __init__(self, segment: Segment):
        self.segment = segment
        s = segment
        if s.size < _SLOTS or s.load_u64(_HEADER["magic"]) != _MAGIC:
            raise ValueError(f"segment {s.name} is not a dfastllm control block")
        if s.load_u64(_HEADER["version"]) != _LAYOUT_VERSION:
            raise ValueError(f"control block {s.name} has layout version {s.load_u64(_HEADER['version'])}, "
                             f"expected {_LAYOUT_VERSION}")
        self.n_slots = s.load_u64(_HEADER["n_slots"])
        self._config = _config_offset(self.n_slots)
        self.doorbell: Doorbell = s.doorbell(_DOORBELL)

    # ---------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, name: str, n_slots: int, *, config_capacity: int = DEFAULT_CONFIG_CAPACITY) -> ControlBlock:
        if not 1 <= n_slots <= 4096:
            raise ValueError(f"n_slots must be in [1, 4096], got {n_slots}")
        config = _config_offset(n_slots)
        segment = Segment.create(name, config + SEQLOCK_HEADER_BYTES + config_capacity + 8)
        segment.store_u64(_HEADER["version"], _LAYOUT_VERSION)
        segment.store_u64(_HEADER["n_slots"], n_slots)
        segment.store_u64(_HEADER["config_capacity"], config_capacity)
        segment.store_u64(_HEADER["creator_pid"], os.getpid())
        segment.store_u64(_STATE, EngineState.STOPPED)
        segment.seqlock_init(config, config_capacity)
        segment.store_u64(_HEADER["magic"], _MAGIC)  # last: attach checks it
        return cls(segment)

    @classmethod
    def attach(cls, name: str) -> ControlBlock:
        return cls(Segment.attach(name))

    @property
    def name(self) -> str:
        return self.segment.name

    def unlink(self) -> bool:
        return Segment.unlink(self.segment.name)

    # ---------------------------------------------------------- engine side

    def engine_started(self, pid: int | None = None) -> int:
        """A new engine process announces itself: bumps the generation
        (workers fail what they had in flight with the old one), state
        LOADING, fresh heartbeat. Returns the new generation."""
        s = self.segment
        generation = s.fetch_add_u64(_GENERATION, 1) + 1
        s.store_u64(_ENGINE_PID, os.getpid() if pid is None else pid)
        # The engine is the doorbell's only sleeper: a predecessor that died
        # asleep must not leave every worker put paying for a wake syscall.
        self.doorbell.reset()
        self.beat()
        self.set_state(EngineState.LOADING)
        return generation

    def set_state(self, state: EngineState) -> None:
        """Also rings the doorbell, so an idle engine looks at it now (the
        supervisor sets DRAINING this way)."""
        self.segment.store_u64(_STATE, EngineState(state))
        self.doorbell.ring()

    def beat(self) -> None:
        self.segment.store_u64(_HEARTBEAT, time.monotonic_ns())

    def loop_came_round(self) -> None:
        """The engine loop's own sign of life. The heartbeat comes from a
        thread and goes on while the loop hangs; this word does not."""
        self.segment.store_u64(_LOOP_AT, time.monotonic_ns())

    def publish_load(self, queue_depth: int, running: int) -> None:
        self.segment.store_u64(_QUEUE_DEPTH, queue_depth)
        self.segment.store_u64(_RUNNING, running)

    def publish_device_memory(self, used: int, total: int = 0) -> None:
        self.segment.store_u64(_MEM_USED, used)
        self.segment.store_u64(_MEM_TOTAL, total)

    def publish_circuit(self, state: CircuitState, retry_after_s: float = 0.0) -> None:
        """The engine's circuit breaker moved: `retry_after_s` is how long
        until a half-open probe is allowed (used only while OPEN)."""
        state = CircuitState(state)
        probe_at = time.monotonic_ns() + int(max(retry_after_s, 0.0) * 1e9) if state == CircuitState.OPEN else 0
        # Probe time first: a reader that sees OPEN sees its probe time.
        self.segment.store_u64(_CIRCUIT_PROBE_AT, probe_at)
        self.segment.store_u64(_CIRCUIT_STATE, state)

    # ---------------------------------------------------------- readers

    @property
    def state(self) -> EngineState:
        return EngineState(self.segment.load_u64(_STATE))

    @property
    def generation(self) -> int:
        return self.segment.load_u64(_GENERATION)

    def heartbeat_age(self) -> float:
        return (time.monotonic_ns() - self.segment.load_u64(_HEARTBEAT)) / 1e9

    def loop_age(self) -> float:
        """Seconds since the engine loop last came round (meaningful once READY)."""
        return (time.monotonic_ns() - self.segment.load_u64(_LOOP_AT)) / 1e9

    @property
    def circuit_state(self) -> CircuitState:
        return CircuitState(self.segment.load_u64(_CIRCUIT_STATE))

    def circuit(self) -> tuple[CircuitState, float]:
        """(state, seconds until a half-open probe is allowed; 0 unless OPEN)."""
        state = self.circuit_state
        if state != CircuitState.OPEN:
            return state, 0.0
        return state, max(0.0, (self.segment.load_u64(_CIRCUIT_PROBE_AT) - time.monotonic_ns()) / 1e9)

    def snapshot(self) -> EngineSnapshot:
        s = self.segment
        circuit, retry_after = self.circuit()
        return EngineSnapshot(self.state, s.load_u64(_GENERATION), s.load_u64(_ENGINE_PID), self.heartbeat_age(),
                              s.load_u64(_QUEUE_DEPTH), s.load_u64(_RUNNING), s.load_u64(_MEM_USED),
                              s.load_u64(_MEM_TOTAL), circuit, retry_after)

    # ---------------------------------------------------------- worker slots

    def slot(self, index: int) -> SlotInfo:
        return SlotInfo.from_word(self.segment.load_u64(self._slot_offset(index)))

    def slots(self) -> list[SlotInfo]:
        return [self.slot(i) for i in range(self.n_slots)]

    def claim_slot(self, pid: int | None = None) -> tuple[int, int]:
        """Claim the first FREE slot for `pid` (default: this process);
        returns (slot, generation). NoFreeSlot if every slot is taken."""
        pid = os.getpid() if pid is None else pid
        if not 0 < pid < 1 << 30:
            raise ValueError(f"pid out of range: {pid}")
        for index in range(self.n_slots):
            info = self.slot(index)
            while info.state == SlotState.FREE:
                claimed = SlotInfo(SlotState.CLAIMED, pid, (info.generation + 1) & 0xFFFF_FFFF)
                if self.segment.cas_u64(self._slot_offset(index), info.word, claimed.word):
                    self.doorbell.ring()  # the engine picks the new slot up now
                    return index, claimed.generation
                info = self.slot(index)  # lost a race; look again
        raise NoFreeSlot(f"all {self.n_slots} worker slots of {self.name} are taken")

    def release_slot(self, index: int, generation: int) -> bool:
        """The owner leaves; the engine cancels its requests and frees the
        slot. False if the slot is no longer this claim (already reclaimed)."""
        info = self.slot(index)
        if info.state != SlotState.CLAIMED or info.generation != generation:
            return False
        released = SlotInfo(SlotState.RELEASED, 0, generation)
        if not self.segment.cas_u64(self._slot_offset(index), info.word, released.word):
            return False
        self.doorbell.ring()
        return True

    def begin_reclaim(self, index: int, seen: SlotInfo) -> bool:
        """Take a RELEASED or dead-owner slot, as last seen, into RECLAIMING;
        False if it changed meanwhile."""
        if seen.state not in (SlotState.CLAIMED, SlotState.RELEASED):
            raise ValueError(f"slot {index} in state {seen.state.name} cannot be reclaimed")
        reclaiming = SlotInfo(SlotState.RECLAIMING, 0, seen.generation)
        return self.segment.cas_u64(self._slot_offset(index), seen.word, reclaiming.word)

    def finish_reclaim(self, index: int) -> None:
        info = self.slot(index)
        if info.state != SlotState.RECLAIMING:
            raise ValueError(f"slot {index} is {info.state.name}, not RECLAIMING")
        self.segment.store_u64(self._slot_offset(index), SlotInfo(SlotState.FREE, 0, info.generation).word)

    def _slot_offset(self, index: int) -> int:
        if not 0 <= index < self.n_slots:
            raise IndexError(f"slot {index} out of range [0, {self.n_slots})")
        return _SLOTS + index * _SLOT_BYTES

    # ---------------------------------------------------------- configuration

    def write_config(self, blob: bytes) -> int:
        """Replace the runtime-tunable configuration; returns its version."""
        return self.segment.seqlock_write(self._config, blob)

    def read_config(self) -> tuple[int, bytes]:
        """(version, blob); version 0 and b"" before the first write."""
        return self.segment.seqlock_read(self._config)

    @property
    def config_version(self) -> int:
        """Cheap change check: compare before calling read_config()."""
        return self.segment.load_u64(self._config) // 2


def _config_offset(n_slots: int) -> int:
    return _SLOTS + n_slots * _SLOT_BYTES

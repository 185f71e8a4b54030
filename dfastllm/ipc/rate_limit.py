"""Per-client request counters that every HTTP worker shares: the rate
limit, and the workers' shared estimate of a generation's service time
(for load shedding). Torch-free.

One segment, `<base>-rl`, created by the supervisor beside the control
block and the rings (`create`, `unlink`), attached by each worker
(`attach`). A test or an embedded app without a supervisor uses a private
one (`private`).

The limit is R requests in any 60 seconds per client (an API key id, else
an address). Counts are kept in 5-second buckets; a request is admitted
while the buckets that overlap the last 60 seconds hold at most R requests,
its own included. The oldest bucket is counted whole, so a request counts
against its client for 60 to 65 seconds: conservative, never more than R
in any minute. A request first adds itself and then reads the total, and
takes itself back out when refused, so concurrent workers can only refuse
too much, never admit too much; refused requests do not count.

The table is fixed-size open addressing over 64-bit key hashes (hash 0
means empty). An entry whose newest bucket has left the window is expired
and is reused by the next new client that probes past it, so the table
never grows: at most `capacity` clients are tracked at once. A new client
that finds no free or expired entry within PROBE_LIMIT slots is admitted
uncounted (fail open) and counted in `full_admissions`.

Layout (byte offsets, every word a little-endian u64):

    0    magic, layout version, capacity, claimed entries (slots ever
         taken from empty), full-table admissions, service time (float64 bits)
    64   entries, 128 bytes each:
         [key hash][newest epoch][13 bucket words][unused]
         bucket word = epoch << 24 | count, at index epoch % 13

An epoch is CLOCK_MONOTONIC seconds // 5, the same clock in every process.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import time

from dfastllm._ipc import Segment

_MAGIC = int.from_bytes(b"DFLLRLT1", "little")
_LAYOUT_VERSION = 1
_MAGIC_AT, _VERSION_AT, _CAPACITY_AT, _CLAIMED_AT, _FULL_AT, _SERVICE_TIME_AT = 0, 8, 16, 24, 32, 40
_ENTRIES = 64
_ENTRY_BYTES = 128
_KEY, _NEWEST, _BUCKETS = 0, 8, 16

BUCKET_S = 5
WINDOW_S = 60
# Buckets that overlap the last WINDOW_S seconds: the current one and the 12 before it.
N_BUCKETS = WINDOW_S // BUCKET_S + 1
_COUNT_BITS = 24
_COUNT_MASK = (1 << _COUNT_BITS) - 1
DEFAULT_CAPACITY = 16384  # 2 MiB
PROBE_LIMIT = 32
SERVICE_TIME_WEIGHT = 0.2  # of the newest sample in the moving average


def segment_name(base_name: str) -> str:
    return f"{base_name}-rl"


def key_hash(client_key: str) -> int:
    """A stable 64-bit hash (Python's hash() differs between processes); never 0."""
    digest = hashlib.blake2b(client_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class RateLimitTable:
    def __init__(self, segment: Segment):
        s = segment
        if s.size < _ENTRIES or s.load_u64(_MAGIC_AT) != _MAGIC:
            raise ValueError(f"segment {s.name} is not a dfastllm rate-limit table")
        if s.load_u64(_VERSION_AT) != _LAYOUT_VERSION:
            raise ValueError(f"rate-limit table {s.name} has layout version {s.load_u64(_VERSION_AT)}, "
                             f"expected {_LAYOUT_VERSION}")
        self.segment = s
        self.capacity = s.load_u64(_CAPACITY_AT)

    # ---------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, name: str, capacity: int = DEFAULT_CAPACITY) -> RateLimitTable:
        if not 1 <= capacity <= 1 << 24:
            raise ValueError(f"capacity must be in [1, 2^24], got {capacity}")
        segment = Segment.create(name, _ENTRIES + capacity * _ENTRY_BYTES)
        segment.store_u64(_VERSION_AT, _LAYOUT_VERSION)
        segment.store_u64(_CAPACITY_AT, capacity)
        segment.store_u64(_MAGIC_AT, _MAGIC)  # last: attach checks it
        return cls(segment)

    @classmethod
    def attach(cls, name: str) -> RateLimitTable:
        return cls(Segment.attach(name))

    @classmethod
    def private(cls, capacity: int = DEFAULT_CAPACITY) -> RateLimitTable:
        """A table only this process maps (its name is removed at once)."""
        table = cls.create(f"dfastllm-private-rl-{secrets.token_hex(8)}", capacity)
        Segment.unlink(table.segment.name)
        return table

    @property
    def name(self) -> str:
        return self.segment.name

    def unlink(self) -> bool:
        return Segment.unlink(self.segment.name)

    # ---------------------------------------------------------- the limit

    def acquire(self, client_key: str, limit: int, *, now: float | None = None) -> float | None:
        """Count one request of `client_key` against `limit` requests per
        minute: None if admitted, else the seconds until the oldest counted
        bucket leaves the window (the request is then not counted)."""
        if limit <= 0:
            return None
        now = time.monotonic() if now is None else now
        epoch = int(now // BUCKET_S)
        entry = self._entry(key_hash(client_key), epoch)
        if entry is None:
            self.segment.fetch_add_u64(_FULL_AT, 1)
            return None
        bucket = entry + _BUCKETS + (epoch % N_BUCKETS) * 8
        if not self._increment(bucket, epoch):
            return BUCKET_S  # this bucket is saturated; the next one is not
        self._raise_newest(entry, epoch)
        total, oldest = self._count(entry, epoch)
        if total <= min(limit, _COUNT_MASK):
            return None
        self._decrement(bucket, epoch)
        return max((oldest + N_BUCKETS) * BUCKET_S - now, 0.0)

    def _entry(self, h: int, epoch: int) -> int | None:
        """The offset of `h`'s entry, claiming an empty or expired one if it
        has none; None if the probed slots all belong to live clients."""
        s = self.segment
        start = h % self.capacity
        expired = None
        for i in range(min(PROBE_LIMIT, self.capacity)):
            entry = _ENTRIES + ((start + i) % self.capacity) * _ENTRY_BYTES
            key = s.load_u64(entry + _KEY)
            if key == h:
                return entry
            if key == 0:
                # Entries never go back to empty, so `h` is not further on.
                # An expired entry seen on the way is taken first.
                if expired is not None:
                    break
                # Fresh before taken, so that no other worker sees it expired.
                self._raise_newest(entry, epoch)
                if s.cas_u64(entry + _KEY, 0, h):
                    s.fetch_add_u64(_CLAIMED_AT, 1)
                    return entry
                if s.load_u64(entry + _KEY) == h:
                    return entry  # another worker claimed it for the same client
                continue
            if expired is None and self._expired(entry, epoch):
                expired = (entry, key)
        if expired is None:
            return None
        entry, old_key = expired
        # Its buckets all hold epochs outside the window, so they read as 0
        # for the new client; fresh before taken, as above.
        self._raise_newest(entry, epoch)
        if s.cas_u64(entry + _KEY, old_key, h):
            return entry
        return entry if s.load_u64(entry + _KEY) == h else None

    def _expired(self, entry: int, epoch: int) -> bool:
        return self.segment.load_u64(entry + _NEWEST) + N_BUCKETS <= epoch

    def _increment(self, bucket: int, epoch: int) -> bool:
        s = self.segment
        while True:
            word = s.load_u64(bucket)
            if word >> _COUNT_BITS == epoch:
                if word & _COUNT_MASK == _COUNT_MASK:
                    return False
                new = word + 1
            else:  # the slot still holds a bucket that left the window
                new = epoch << _COUNT_BITS | 1
            if s.cas_u64(bucket, word, new):
                return True

    def _decrement(self, bucket: int, epoch: int) -> None:
        s = self.segment
        while True:
            word = s.load_u64(bucket)
            if word >> _COUNT_BITS != epoch or word & _COUNT_MASK == 0:
                return  # the bucket moved on meanwhile: nothing of ours is left in it
            if s.cas_u64(bucket, word, word - 1):
                return

    def _raise_newest(self, entry: int, epoch: int) -> None:
        s = self.segment
        newest = s.load_u64(entry + _NEWEST)
        while newest < epoch and not s.cas_u64(entry + _NEWEST, newest, epoch):
            newest = s.load_u64(entry + _NEWEST)

    def _count(self, entry: int, epoch: int) -> tuple[int, int]:
        """(requests in the window's buckets, the oldest epoch that has any)."""
        total, oldest = 0, epoch
        for i in range(N_BUCKETS):
            word = self.segment.load_u64(entry + _BUCKETS + i * 8)
            bucket_epoch, count = word >> _COUNT_BITS, word & _COUNT_MASK
            if count and epoch - N_BUCKETS < bucket_epoch <= epoch:
                total += count
                oldest = min(oldest, bucket_epoch)
        return total, oldest

    # ---------------------------------------------------------- sizes

    def live_entries(self, *, now: float | None = None) -> int:
        """Clients counted in the current window (a scan of the table)."""
        epoch = int((time.monotonic() if now is None else now) // BUCKET_S)
        s = self.segment
        live = 0
        for i in range(self.capacity):
            entry = _ENTRIES + i * _ENTRY_BYTES
            if s.load_u64(entry + _KEY) and not self._expired(entry, epoch):
                live += 1
        return live

    @property
    def claimed_entries(self) -> int:
        """Slots ever taken (<= capacity; expired ones are reused, not freed)."""
        return self.segment.load_u64(_CLAIMED_AT)

    @property
    def full_admissions(self) -> int:
        """Requests admitted uncounted because no slot was free."""
        return self.segment.load_u64(_FULL_AT)

    # ---------------------------------------------------------- service time

    def record_service_time(self, seconds: float) -> None:
        """Fold one generation's duration into the shared moving average."""
        s = self.segment
        while True:
            word = s.load_u64(_SERVICE_TIME_AT)
            old = _from_bits(word)
            new = seconds if word == 0 else old + SERVICE_TIME_WEIGHT * (seconds - old)
            if s.cas_u64(_SERVICE_TIME_AT, word, _to_bits(new)):
                return

    def service_time(self) -> float | None:
        """The moving average of recent generations' durations; None before the first."""
        word = self.segment.load_u64(_SERVICE_TIME_AT)
        return _from_bits(word) if word else None


def _to_bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", max(value, 1e-9)))[0]


def _from_bits(word: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", word))[0]


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1 (Retry-After has no fractions)."""
    return str(max(1, math.ceil(seconds)))

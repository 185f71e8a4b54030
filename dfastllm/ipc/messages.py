"""Every message between an HTTP worker and the engine, and the one codec.

Worker -> engine: SUBMIT, CANCEL. Engine -> worker: TOKENS, FINISHED, ERROR,
REJECTED, CANCEL_ACK. A message on the wire is a 2-byte header (magic, kind)
then the kind's fields packed with `struct` in native byte order (both ends
run on one machine): strings as a length prefix plus UTF-8, token ids as a
count plus raw int32 (no pickle, no JSON). `decode` refuses unknown kinds, truncated or trailing bytes and
out-of-range values with `DecodeError`, so a bad frame never becomes a
half-built message. (After vLLM V1's `v1/engine/__init__.py`.)

There is no HELLO/BYE: a worker attaches by claiming a slot in the control
block (see `dfastllm.ipc.control`), which the engine sees without a message.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import time
from array import array
from collections.abc import Callable, Sequence
from typing import ClassVar, Union

from dfastllm.sampling_params import DreamAlg, Remasking, SamplingParams

MAX_REQUEST_ID_CHARS = 128  # a client's request id (X-Request-ID, DELETE /v1/requests/{id})
# Choice i > 0 of a request (n > 1, several prompts) runs as "<request id>#<i>":
# "#" is outside the client ids' alphabet, so no client id can collide with it.
CHOICE_SEPARATOR = "#"
MAX_ENGINE_ID_CHARS = MAX_REQUEST_ID_CHARS + 8  # a request id and "#<i>"


def choice_id(request_id: str, index: int) -> str:
    """The engine id of choice `index` of a request; the first is the
    request id itself."""
    return request_id if index == 0 else f"{request_id}{CHOICE_SEPARATOR}{index}"


def is_choice_of(engine_id: str, request_id: str) -> bool:
    return engine_id == request_id or engine_id.startswith(request_id + CHOICE_SEPARATOR)


_MAGIC = 0xDF


class MsgKind(enum.IntEnum):
    SUBMIT = 1
    CANCEL = 2
    TOKENS = 3
    FINISHED = 4
    ERROR = 5
    REJECTED = 6
    CANCEL_ACK = 7


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, end of turn or a stop token
    LENGTH = 1  # max_tokens reached
    CANCELLED = 2  # CANCEL, client gone, deadline

    @property
    def api_name(self) -> str:
        """The OpenAI `finish_reason` string."""
        return self.name.lower()


class RejectReason(enum.IntEnum):
    """Why the engine refused a SUBMIT before admitting it."""

    QUEUE_FULL = 1  # -> 503 overloaded
    DUPLICATE_ID = 2  # -> 409 duplicate_request_id
    DRAINING = 3  # -> 503 engine_unavailable
    NOT_READY = 4  # -> 503 engine_unavailable (loading, warming)
    INVALID = 5  # -> 400 (e.g. prompt + max_tokens over the model's length)


class DecodeError(ValueError):
    """A frame that is not a valid message. `request_id` is set when the
    frame got far enough to name its request, so the engine can still answer
    that request with an ERROR instead of leaving it hanging."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


@dataclasses.dataclass(slots=True)
class Submit:
    KIND: ClassVar[MsgKind] = MsgKind.SUBMIT
    request_id: str  # the engine-facing id, unique across workers
    worker_slot: int  # control-block slot of the sending worker
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    trace_context: str = ""  # W3C traceparent (and tracestate), or empty
    submit_time_ns: int = dataclasses.field(default_factory=time.monotonic_ns)  # CLOCK_MONOTONIC, machine-wide


@dataclasses.dataclass(slots=True)
class Cancel:
    KIND: ClassVar[MsgKind] = MsgKind.CANCEL
    request_id: str  # any worker's request (the DELETE endpoint)
    reply_tag: int  # echoed in CANCEL_ACK to the sender; 0..2^64-1
    # Also every other choice of the request (`choice_id`), as DELETE means: its
    # first choice may have finished while the others still run.
    all_choices: bool = False
    # The request was refused as a whole (another of its choices was): this
    # choice goes, and its id may be used again, as a refused request's may.
    withdraw: bool = False


@dataclasses.dataclass(slots=True)
class Tokens:
    KIND: ClassVar[MsgKind] = MsgKind.TOKENS
    request_id: str
    token_ids: Sequence[int]  # newly committed contiguous prefix


@dataclasses.dataclass(slots=True)
class Finished:
    KIND: ClassVar[MsgKind] = MsgKind.FINISHED
    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # tokens actually returned (up to EOS)
    steps: int  # denoising steps run for this request
    queue_time: float  # seconds from submit to admission into the batch
    run_time: float  # seconds from admission to finish


@dataclasses.dataclass(slots=True)
class Error:
    KIND: ClassVar[MsgKind] = MsgKind.ERROR
    request_id: str
    message: str


@dataclasses.dataclass(slots=True)
class Rejected:
    KIND: ClassVar[MsgKind] = MsgKind.REJECTED
    request_id: str
    reason: RejectReason
    message: str = ""


@dataclasses.dataclass(slots=True)
class CancelAck:
    KIND: ClassVar[MsgKind] = MsgKind.CANCEL_ACK
    reply_tag: int
    found: bool  # False: unknown or already finished


Message = Union[Submit, Cancel, Tokens, Finished, Error, Rejected, CancelAck]

_HEADER = struct.Struct("=BB")  # magic, kind
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_SLOT_TIME = struct.Struct("=Iq")  # worker_slot, submit_time_ns
# max_tokens, temperature, top_p, steps, block_length, remasking, threshold,
# seed, ignore_eos, top_k, alg, alg_temp, eps, editing_threshold,
# max_post_steps, presence bits of the optional fields (see _OPTIONAL).
_PARAMS = struct.Struct("=IddIIBdQBIBdddIH")
_OPTIONAL = ("steps", "block_length", "threshold", "seed", "top_k", "alg", "alg_temp", "eps", "editing_threshold",
             "max_post_steps")
# Every SamplingParams field the codec carries; a test checks this against
# the dataclass so a new field cannot be silently dropped on the wire.
PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "steps", "block_length", "remasking",
                "threshold", "seed", "stop_token_ids", "ignore_eos", "top_k", "alg", "alg_temp", "eps",
                "editing_threshold", "max_post_steps")
_FINISHED = struct.Struct("=BIIIdd")
_REJECTED = struct.Struct("=B")
_ACK = struct.Struct("=QB")
_CANCEL = struct.Struct("=QB")  # reply tag, flags
_ALL_CHOICES, _WITHDRAW = 1, 2


# ---------------------------------------------------------------- encoding

def _str(text: str, prefix: struct.Struct) -> bytes:
    raw = text.encode()
    return prefix.pack(len(raw)) + raw


def _request_id(request_id: str) -> bytes:
    if not 0 < len(request_id) <= MAX_ENGINE_ID_CHARS:
        raise ValueError(f"request_id must be 1-{MAX_ENGINE_ID_CHARS} characters, got {len(request_id)}")
    return _str(request_id, _U16)


def _int32s(ids: Sequence[int]) -> bytes:
    if not (isinstance(ids, array) and ids.typecode == "i"):
        try:
            ids = array("i", ids)
        except OverflowError:
            raise ValueError("token ids must fit in int32") from None
    return _U32.pack(len(ids)) + ids.tobytes()


def _params(p: SamplingParams) -> bytes:
    present = 0
    for bit, name in enumerate(_OPTIONAL):
        if getattr(p, name) is not None:
            present |= 1 << bit
    fixed = _PARAMS.pack(p.max_tokens, p.temperature, p.top_p, p.steps or 0, p.block_length or 0, int(p.remasking),
                         p.threshold or 0.0, p.seed or 0, p.ignore_eos, p.top_k or 0, int(p.alg or 0),
                         p.alg_temp or 0.0, p.eps or 0.0, p.editing_threshold or 0.0, p.max_post_steps or 0, present)
    return fixed + _int32s(p.stop_token_ids)


def _encode_submit(m: Submit) -> list[bytes]:
    return [_request_id(m.request_id), _SLOT_TIME.pack(m.worker_slot, m.submit_time_ns), _params(m.params),
            _int32s(m.prompt_token_ids), _str(m.trace_context, _U16)]


_ENCODERS: dict[type, Callable[..., list[bytes]]] = {
    Submit: _encode_submit,
    Cancel: lambda m: [_request_id(m.request_id), _CANCEL.pack(
        m.reply_tag, _ALL_CHOICES * m.all_choices | _WITHDRAW * m.withdraw)],
    Tokens: lambda m: [_request_id(m.request_id), _int32s(m.token_ids)],
    Finished: lambda m: [_request_id(m.request_id), _FINISHED.pack(
        FinishReason(m.reason), m.prompt_tokens, m.completion_tokens, m.steps, m.queue_time, m.run_time)],
    Error: lambda m: [_request_id(m.request_id), _str(m.message, _U32)],
    Rejected: lambda m: [_request_id(m.request_id), _REJECTED.pack(RejectReason(m.reason)), _str(m.message, _U32)],
    CancelAck: lambda m: [_ACK.pack(m.reply_tag, m.found)],
}


def encode(msg: Message) -> bytes:
    """The frame for one message; ValueError if a field cannot be carried."""
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        raise TypeError(f"not a dfastllm IPC message: {type(msg).__name__}")
    try:
        parts = encoder(msg)
    except struct.error as exc:
        raise ValueError(f"{type(msg).__name__}: a field is out of range ({exc})") from None
    return _HEADER.pack(_MAGIC, msg.KIND) + b"".join(parts)


# ---------------------------------------------------------------- decoding

class _Reader:
    """Walks a frame; every read checks the bytes are there."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview, pos: int):
        self.buf = buf
        self.pos = pos

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise DecodeError(f"truncated frame: needs {end} bytes, has {len(self.buf)}")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def unpack(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.take(fmt.size))

    def str(self, prefix: struct.Struct) -> str:
        (n,) = self.unpack(prefix)
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise DecodeError("string field is not valid UTF-8") from None

    def request_id(self) -> str:
        rid = self.str(_U16)
        if not 0 < len(rid) <= MAX_ENGINE_ID_CHARS:
            raise DecodeError(f"request_id must be 1-{MAX_ENGINE_ID_CHARS} characters, got {len(rid)}")
        return rid

    def int32s(self) -> list[int]:
        (n,) = self.unpack(_U32)
        ids = array("i")
        ids.frombytes(self.take(4 * n))
        return ids.tolist()


def _enum(cls: type[enum.IntEnum], value: int):
    try:
        return cls(value)
    except ValueError:
        raise DecodeError(f"unknown {cls.__name__} {value}") from None


def _decode_params(r: _Reader) -> SamplingParams:
    (max_tokens, temperature, top_p, steps, block_length, remasking, threshold, seed, ignore_eos, top_k, alg,
     alg_temp, eps, editing_threshold, max_post_steps, present) = r.unpack(_PARAMS)
    values = (steps, block_length, threshold, seed, top_k, _enum(DreamAlg, alg), alg_temp, eps, editing_threshold,
              max_post_steps)
    optional = {name: value if present >> bit & 1 else None for bit, (name, value) in enumerate(zip(_OPTIONAL, values))}
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          remasking=_enum(Remasking, remasking), ignore_eos=bool(ignore_eos),
                          stop_token_ids=tuple(r.int32s()), **optional)


def _decode_submit(r: _Reader) -> Submit:
    request_id = r.request_id()
    try:
        slot, submit_time_ns = r.unpack(_SLOT_TIME)
        params = _decode_params(r)
        return Submit(request_id, slot, r.int32s(), params, r.str(_U16), submit_time_ns)
    except DecodeError as exc:
        raise DecodeError(str(exc), request_id) from None
    except ValueError as exc:  # SamplingParams.validate
        raise DecodeError(f"SUBMIT {request_id!r}: invalid sampling params: {exc}", request_id) from None


def _decode_finished(r: _Reader) -> Finished:
    request_id = r.request_id()
    reason, prompt, completion, steps, queue_time, run_time = r.unpack(_FINISHED)
    return Finished(request_id, _enum(FinishReason, reason), prompt, completion, steps, queue_time, run_time)


def _decode_rejected(r: _Reader) -> Rejected:
    request_id = r.request_id()
    (reason,) = r.unpack(_REJECTED)
    return Rejected(request_id, _enum(RejectReason, reason), r.str(_U32))


def _decode_cancel(r: _Reader) -> Cancel:
    request_id = r.request_id()
    tag, flags = r.unpack(_CANCEL)
    if flags & ~(_ALL_CHOICES | _WITHDRAW):
        raise DecodeError(f"CANCEL flags {flags:#x} has unknown bits")
    return Cancel(request_id, tag, bool(flags & _ALL_CHOICES), bool(flags & _WITHDRAW))


def _decode_ack(r: _Reader) -> CancelAck:
    tag, found = r.unpack(_ACK)
    if found > 1:
        raise DecodeError(f"CANCEL_ACK found flag must be 0 or 1, got {found}")
    return CancelAck(tag, bool(found))


_DECODERS: dict[int, Callable[[_Reader], Message]] = {
    MsgKind.SUBMIT: _decode_submit,
    MsgKind.CANCEL: _decode_cancel,
    MsgKind.TOKENS: lambda r: Tokens(r.request_id(), r.int32s()),
    MsgKind.FINISHED: _decode_finished,
    MsgKind.ERROR: lambda r: Error(r.request_id(), r.str(_U32)),
    MsgKind.REJECTED: _decode_rejected,
    MsgKind.CANCEL_ACK: _decode_ack,
}


def decode(buf: bytes | bytearray | memoryview) -> Message:
    """The message in one frame; DecodeError for anything that is not a
    complete, valid frame of a known kind."""
    view = memoryview(buf)
    if len(view) < _HEADER.size:
        raise DecodeError(f"frame of {len(view)} bytes is shorter than the header")
    magic, kind = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise DecodeError(f"bad magic byte 0x{magic:02x} (not a dfastllm IPC frame)")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise DecodeError(f"unknown message kind {kind}")
    reader = _Reader(view, _HEADER.size)
    msg = decoder(reader)
    if reader.pos != len(view):
        raise DecodeError(f"{len(view) - reader.pos} trailing bytes after a {MsgKind(kind).name} message",
                          getattr(msg, "request_id", None))
    return msg

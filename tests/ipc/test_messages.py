import dataclasses
import random
import struct

import pytest

from dfastllm.ipc.messages import (MAX_ENGINE_ID_CHARS, MAX_REQUEST_ID_CHARS, PARAM_FIELDS, Cancel, CancelAck,
                                   DecodeError, Error, Finished, FinishReason, MsgKind, Rejected, RejectReason, Submit,
                                   Tokens, choice_id, decode, encode, is_choice_of)
from dfastllm.sampling_params import DreamAlg, Remasking, SamplingParams

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(0, 200_000) for _ in range(n)] + ([INT32_MAX, INT32_MIN] if n else [])


def all_kinds(rng: random.Random) -> list:
    """One message of every kind, with non-trivial values."""
    params = SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, steps=64, block_length=32,
                            remasking=Remasking.MARGIN, threshold=0.85, seed=2**63 - 1,
                            stop_token_ids=(126081, 7), ignore_eos=True)
    return [
        Submit("req-Ω-1", 3, random_ids(rng, 50), params, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
               123_456_789),
        Cancel("other-worker:req.9", 2**64 - 1),
        Cancel("req-3", 5, all_choices=True),
        Cancel("req-4", 6, withdraw=True),
        Cancel("req-5", 7, all_choices=True, withdraw=True),
        Tokens("r", random_ids(rng, 17)),
        Finished("r", FinishReason.LENGTH, 50, 256, 64, 0.0125, 3.5),
        Error("r", "CUDA error: out of memory ✗"),
        Rejected("r", RejectReason.QUEUE_FULL, "queue full (512 waiting)"),
        CancelAck(42, True),
    ]


def test_every_kind_round_trips():
    messages = all_kinds(random.Random(1))
    assert {m.KIND for m in messages} == set(MsgKind)
    assert decode(encode(Cancel("r", 1))) == Cancel("r", 1, all_choices=False, withdraw=False)
    for msg in messages:
        assert decode(encode(msg)) == msg


def test_codec_carries_every_sampling_params_field():
    assert set(PARAM_FIELDS) == {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.mark.parametrize("params", [
    SamplingParams(),  # every optional field None, remasking default
    SamplingParams(max_tokens=1, temperature=2.0, top_p=0.01, steps=1, block_length=1, threshold=1.0, seed=0,
                   remasking="random"),
    SamplingParams(max_tokens=4096, remasking=Remasking.ENTROPY, stop_token_ids=tuple(range(300))),
    SamplingParams(max_tokens=64, top_k=40, alg=DreamAlg.TOPK_MARGIN, alg_temp=0.25, eps=0.01, temperature=0.2),
    SamplingParams(alg="maskgit_plus", alg_temp=0.0, threshold=0.9),  # zeros that are given, not omitted
    SamplingParams(editing_threshold=0.0, max_post_steps=0),  # LLaDA2's fields: 0 stays 0
    SamplingParams(top_k=50, editing_threshold=0.9, max_post_steps=16),
])
def test_submit_params_round_trip(params):
    msg = Submit("x", 0, [], params)
    back = decode(encode(msg))
    assert back == msg
    assert back.params.steps is params.steps and back.params.seed == params.seed  # None stays None, 0 stays 0


def test_empty_and_large_payloads():
    rng = random.Random(2)
    big = random_ids(rng, 100_000)
    for msg in (Tokens("r", []), Tokens("r", big), Submit("r", 1, big, SamplingParams(), ""),
                Error("r", ""), Rejected("r", RejectReason.DRAINING), Error("r", "e" * 1_000_000)):
        assert decode(encode(msg)) == msg
    assert len(encode(Tokens("r", big))) < 4 * len(big) + 16  # raw int32, not text


def test_decode_accepts_memoryview_and_bytearray():
    frame = encode(Tokens("r", [1, 2, 3]))
    assert decode(memoryview(frame)) == decode(bytearray(frame)) == Tokens("r", [1, 2, 3])


def test_every_truncation_and_any_trailing_byte_is_refused():
    for msg in all_kinds(random.Random(3)):
        frame = encode(msg)
        for cut in range(len(frame)):
            with pytest.raises(DecodeError):
                decode(frame[:cut])
        with pytest.raises(DecodeError, match="trailing"):
            decode(frame + b"\x00")


def test_garbage_is_refused():
    rng = random.Random(4)
    with pytest.raises(DecodeError, match="magic"):
        decode(b"\x00\x01" + rng.randbytes(30))
    with pytest.raises(DecodeError, match="unknown message kind 99"):
        decode(bytes([0xDF, 99]) + rng.randbytes(30))
    for _ in range(2000):
        kind = rng.choice(list(MsgKind))
        with pytest.raises(DecodeError):
            decode(bytes([0xDF, kind]) + rng.randbytes(rng.randint(0, 3)))


def test_bad_field_values_are_refused():
    frame = bytearray(encode(Finished("r", FinishReason.STOP, 1, 1, 1, 0.0, 0.0)))
    frame[2 + 2 + 1] = 77  # header, request id "r", then the reason byte
    with pytest.raises(DecodeError, match="unknown FinishReason 77"):
        decode(bytes(frame))

    frame = bytearray(encode(Tokens("ab", [1])))
    frame[4] = 0xFF  # inside the request id: not UTF-8
    with pytest.raises(DecodeError, match="UTF-8"):
        decode(bytes(frame))

    ack = bytearray(encode(CancelAck(1, False)))
    ack[-1] = 2
    with pytest.raises(DecodeError, match="found flag"):
        decode(bytes(ack))

    cancel = bytearray(encode(Cancel("r", 1)))
    cancel[-1] = 4
    with pytest.raises(DecodeError, match="unknown bits"):
        decode(bytes(cancel))


def test_invalid_sampling_params_name_the_request():
    frame = bytearray(encode(Submit("req-7", 0, [1], SamplingParams(temperature=0.5))))
    temperature_at = 2 + 2 + len("req-7") + 12 + 4  # after the slot/time and max_tokens
    assert struct.unpack_from("=d", frame, temperature_at)[0] == 0.5
    struct.pack_into("=d", frame, temperature_at, 5.0)
    with pytest.raises(DecodeError, match="temperature") as info:
        decode(bytes(frame))
    assert info.value.request_id == "req-7"


def test_choice_ids_of_the_longest_request_id_fit_the_wire():
    longest = "x" * MAX_REQUEST_ID_CHARS
    last = choice_id(longest, 10**7 - 1)  # far more choices than a request may ask for
    assert len(last) <= MAX_ENGINE_ID_CHARS and decode(encode(Tokens(last, [1]))).request_id == last
    assert choice_id("req", 0) == "req" and is_choice_of("req", "req") and is_choice_of(choice_id("req", 3), "req")
    assert not is_choice_of("req-2", "req") and not is_choice_of(choice_id("req-2", 1), "req")


def test_encode_refuses_what_the_wire_cannot_carry():
    with pytest.raises(ValueError, match="request_id"):
        encode(Tokens("x" * (MAX_ENGINE_ID_CHARS + 1), [1]))
    with pytest.raises(ValueError, match="request_id"):
        encode(Cancel("", 1))
    with pytest.raises(ValueError, match="int32"):
        encode(Tokens("r", [2**31]))
    with pytest.raises(ValueError, match="out of range"):
        encode(Cancel("r", -1))
    with pytest.raises(ValueError):
        encode(Finished("r", 9, 1, 1, 1, 0.0, 0.0))
    with pytest.raises(TypeError, match="not a dfastllm IPC message"):
        encode(("SUBMIT", "r"))
    assert decode(encode(Tokens("x" * MAX_ENGINE_ID_CHARS, [1]))).request_id == "x" * MAX_ENGINE_ID_CHARS


def test_finish_reason_api_names():
    assert [r.api_name for r in FinishReason] == ["stop", "length", "cancelled"]

"""RequestRouter on its own, over a real EngineCore on the tiny LLaDA
checkpoint: what it admits or refuses (and with which reason), which id a
refusal leaves free, what each worker is sent and in which order, and the
circuit breaker driven by the engine's real failure path (the model's
forward made to raise by `inject_step_errors`)."""

from __future__ import annotations

import time

import pytest
import torch

from dfastllm.config import ServerConfig
from dfastllm.engine import EngineCore
from dfastllm.engine.process import inject_step_errors
from dfastllm.engine.router import RequestRouter
from dfastllm.ipc.control import CircuitState
from dfastllm.ipc.messages import (Cancel, CancelAck, Error, Finished, FinishReason, Rejected, RejectReason, Submit,
                                   Tokens)
from dfastllm.sampling_params import SamplingParams

from .conftest import generate, prompt

pytestmark = pytest.mark.timeout(60)

PARAMS = SamplingParams(max_tokens=8, block_length=4, steps=4, ignore_eos=True, seed=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's ops are too small to share: on a loaded machine a
    second thread makes each step ~10x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def core(llada):
    core = EngineCore(llada, max_batch_size=2, seed=0)
    yield core
    vars(core.model).pop("forward_packed", None)  # the model is the session's: undo inject_step_errors


def router(core, **config) -> RequestRouter:
    return RequestRouter(core, ServerConfig(**config))


def submit(r: RequestRouter, rid: str, *, slot: int = 0, prompt_ids=None, submitted_ago_s: float = 0.0):
    msg = Submit(rid, slot, prompt(4) if prompt_ids is None else prompt_ids, PARAMS,
                 submit_time_ns=time.monotonic_ns() - int(submitted_ago_s * 1e9))
    return r.submit(slot, msg)


def ack(rid: str, slot: int = 0):
    return [(slot, Tokens(rid, []))]


def refusal(replies) -> RejectReason:
    [(_, msg)] = replies
    assert isinstance(msg, Rejected), msg
    return msg.reason


def drive(r: RequestRouter, max_steps: int = 200) -> list:
    """Step until the router holds no request; -> every reply, in order."""
    replies = []
    for _ in range(max_steps):
        if not r.live:
            return replies
        replies += r.step()
    raise AssertionError(f"still live after {max_steps} steps: {list(r.live)}")


def streamed(replies, rid: str) -> list[int]:
    return [t for _, m in replies if isinstance(m, Tokens) and m.request_id == rid for t in m.token_ids]


def finished(replies) -> dict[str, tuple[int, Finished]]:
    return {m.request_id: (slot, m) for slot, m in replies if isinstance(m, Finished)}


def test_a_submit_is_acknowledged_then_streams_to_its_worker(core, llada):
    r = router(core)
    assert submit(r, "a", slot=3, prompt_ids=prompt(5)) == ack("a", slot=3)
    assert core.num_waiting == 1 and list(r.live) == ["a"]
    replies = drive(r)
    assert {slot for slot, _ in replies} == {3}
    assert isinstance(replies[-1][1], Finished)
    # The same tokens as the engine alone gives, then FINISHED with its counts.
    assert streamed(replies, "a") == generate(llada, [("a", prompt(5), PARAMS)])["a"][0]
    done = replies[-1][1]
    assert (done.request_id, done.reason, done.prompt_tokens, done.completion_tokens, done.steps) == \
        ("a", FinishReason.LENGTH, 5, 8, 4)
    assert 0 <= done.queue_time and 0 < done.run_time
    assert r.table_sizes() == {"engine_live_requests": 0, "engine_scheduled_requests": 0, "engine_recent_ids": 1}


def test_a_duplicate_id_is_refused_while_live_and_after_it_finished(core):
    r = router(core)  # the default window, 600 s
    assert submit(r, "a") == ack("a")
    assert refusal(submit(r, "a", slot=1)) == RejectReason.DUPLICATE_ID  # while live, from any worker
    replies = drive(r)
    assert set(finished(replies)) == {"a"} and {slot for slot, _ in replies} == {0}  # the first one is untouched
    assert refusal(submit(r, "a")) == RejectReason.DUPLICATE_ID  # finished, still within the window


def test_an_id_is_free_again_once_the_dedup_window_passed(core):
    r = router(core, dedup_window_s=0.2)
    assert submit(r, "a") == ack("a")
    r.cancel(0, Cancel("a", reply_tag=1))
    assert refusal(submit(r, "a")) == RejectReason.DUPLICATE_ID
    time.sleep(0.25)
    assert submit(r, "a") == ack("a")


def test_a_full_queue_sheds_new_requests_and_a_shed_id_may_be_retried(core):
    r = router(core, max_queue=2)  # the core runs 2 rows
    assert submit(r, "a") == ack("a") and submit(r, "b") == ack("b")
    [(slot, shed)] = submit(r, "c")
    assert (slot, shed.reason) == (0, RejectReason.QUEUE_FULL) and "2 requests waiting" in shed.message
    assert core.num_waiting == 2 and "c" not in r.live
    r.step()  # a and b join the batch: the queue is empty again
    assert core.num_waiting == 0 and core.num_running == 2
    assert submit(r, "c") == ack("c")  # its id was not consumed by the refusal
    assert submit(r, "d") == ack("d")
    assert refusal(submit(r, "e")) == RejectReason.QUEUE_FULL
    assert set(finished(drive(r))) == {"a", "b", "c", "d"}


def test_an_invalid_request_is_rejected_without_consuming_its_id(core):
    r = router(core)
    [(_, too_long)] = submit(r, "a", prompt_ids=prompt(600))
    assert too_long.reason == RejectReason.INVALID and "exceeds max_model_len" in too_long.message
    [(_, bad_token)] = submit(r, "a", prompt_ids=[40, 320, 41])
    assert bad_token.reason == RejectReason.INVALID and "token id 320 is outside the vocabulary" in bad_token.message
    assert not core.has_unfinished() and not r.live and "a" not in r.recent_ids
    assert r.circuit.state == CircuitState.CLOSED  # a bad request is not a failing engine
    assert submit(r, "a") == ack("a")
    assert finished(drive(r))["a"][1].reason == FinishReason.LENGTH


def test_cancel_finishes_the_request_for_its_owner_and_acks_the_sender(core):
    r = router(core)
    assert submit(r, "a", slot=0) == ack("a")
    r.step()  # running now
    assert core.num_running == 1
    replies = r.cancel(1, Cancel("a", reply_tag=7))
    assert [slot for slot, _ in replies] == [0, 1]
    (_, done), (_, cancel_ack) = replies
    assert (done.request_id, done.reason, done.prompt_tokens) == ("a", FinishReason.CANCELLED, 4)
    assert cancel_ack == CancelAck(7, True)
    assert not core.has_unfinished() and core.canvas.num_free == 2 and not r.live
    assert r.step() == []  # nothing more is sent for it
    assert r.cancel(1, Cancel("a", reply_tag=8)) == [(1, CancelAck(8, False))]  # gone: found=False
    assert refusal(submit(r, "a")) == RejectReason.DUPLICATE_ID  # a cancelled id stays used ...
    assert r.cancel(1, Cancel("a", reply_tag=9, withdraw=True)) == [(1, CancelAck(9, False))]
    assert submit(r, "a") == ack("a")  # ... unless withdrawn


def test_cancel_of_all_choices_reaches_every_owner(core):
    r = router(core)
    for rid, slot in (("q", 0), ("q#1", 2), ("qq", 0)):
        assert submit(r, rid, slot=slot) == ack(rid, slot)
    replies = r.cancel(1, Cancel("q", reply_tag=5, all_choices=True))
    assert [(slot, type(m).__name__, getattr(m, "request_id", None)) for slot, m in replies] == \
        [(0, "Finished", "q"), (2, "Finished", "q#1"), (1, "CancelAck", None)]
    assert list(r.live) == ["qq"] and core.num_waiting == 1  # "qq" is another request, not a choice of "q"


def test_a_request_past_its_timeout_is_finished_as_cancelled(core):
    r = router(core, request_timeout_s=5.0)
    assert submit(r, "late", submitted_ago_s=6.0) == ack("late")  # the deadline counts from the worker's SUBMIT
    assert submit(r, "on_time") == ack("on_time")
    replies = drive(r)
    done = finished(replies)
    assert done["late"][1].reason == FinishReason.CANCELLED and streamed(replies, "late") == []
    assert done["on_time"][1].reason == FinishReason.LENGTH


def test_draining_refuses_new_submits_and_finishes_the_admitted(core):
    r = router(core)
    assert submit(r, "before") == ack("before")
    r.draining = True
    assert refusal(submit(r, "after")) == RejectReason.DRAINING
    assert core.num_waiting == 1 and "after" not in r.recent_ids
    assert finished(drive(r))["before"][1].reason == FinishReason.LENGTH


def test_a_worker_gone_aborts_its_requests_only(core):
    r = router(core)
    assert submit(r, "mine", slot=0) == ack("mine") and submit(r, "theirs", slot=1) == ack("theirs", 1)
    r.step()
    assert r.drop_worker(0, "worker_gone") == ["mine"]
    assert core.num_running == 1 and list(r.live) == ["theirs"]
    replies = drive(r)
    assert {slot for slot, _ in replies} == {1} and set(finished(replies)) == {"theirs"}


def test_failing_steps_open_the_circuit_and_a_successful_probe_closes_it(core):
    r = router(core, circuit_failures=2, circuit_cooldown_s=0.3)
    inject_step_errors(core, 2)
    for rid in ("a", "b"):
        assert r.circuit.state == CircuitState.CLOSED
        assert submit(r, rid) == ack(rid)
        [(slot, error)] = r.step()
        assert slot == 0 and error == Error(rid, "RuntimeError: injected fault")
    assert r.circuit.state == CircuitState.OPEN and not r.live and not core.has_unfinished()
    assert refusal(submit(r, "c")) == RejectReason.NOT_READY

    time.sleep(0.35)  # the cool-down: one probe is admitted, the rest refused while it runs
    assert submit(r, "c") == ack("c")  # the id the open circuit refused is free
    assert r.circuit.state == CircuitState.HALF_OPEN
    assert refusal(submit(r, "d")) == RejectReason.NOT_READY
    assert finished(drive(r))["c"][1].reason == FinishReason.LENGTH  # the model works again
    assert r.circuit.state == CircuitState.CLOSED
    assert submit(r, "d") == ack("d")

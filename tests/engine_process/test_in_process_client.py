"""InProcessEngineClient: the EngineClient interface over a real EngineCore
in a thread of this process (tests, embedding)."""

import asyncio
import random

import pytest
import torch

from dfastllm import LLM, SamplingParams
from dfastllm.config import ServerConfig
from dfastllm.engine.client import EngineRejected, EngineUnavailable, FinishedEvent, InProcessEngineClient
from dfastllm.ipc import EngineState
from dfastllm.ipc.messages import RejectReason
from dfastllm.models import load_model

from .helpers import random_requests, read_all

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tiny_llada_dir):
    return load_model(tiny_llada_dir)


def run(client: InProcessEngineClient, body):
    async def main():
        await client.start()
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


@pytest.mark.timeout(120)
def test_concurrent_requests_get_the_offline_tokens(loaded):
    seed = random.randrange(2**32)
    requests = random_requests(random.Random(seed), f"in-process-{seed}", 10)
    llm = LLM(loaded)
    expected = llm.generate([r["prompt"] for r in requests], [SamplingParams(**r["params"]) for r in requests])

    async def body(client):
        streams = await asyncio.gather(*(client.submit(r["id"], r["prompt"], SamplingParams(**r["params"]))
                                         for r in requests))
        return await asyncio.gather(*(read_all(s) for s in streams))

    results = run(InProcessEngineClient(loaded, ServerConfig(max_batch_size=4)), body)
    for (tokens, final), want in zip(results, expected):
        assert tokens == want.token_ids, f"seed {seed}"
        assert isinstance(final, FinishedEvent) and final.reason == want.finish_reason
        assert final.completion_tokens == len(tokens) and final.steps == want.num_steps


@pytest.mark.timeout(60)
def test_refusals_follow_the_admission_rules(loaded):
    long = SamplingParams(max_tokens=300, ignore_eos=True)

    async def body(client):
        with pytest.raises(EngineRejected) as invalid:
            await client.submit("bad-token", [40, 10**6], long)
        assert invalid.value.reason == RejectReason.INVALID and "vocabulary" in invalid.value.message
        running = await client.submit("running", [40, 41], long)
        await anext(running)  # it holds the batch's only row
        await client.submit("waiting", [40, 42], long)
        with pytest.raises(EngineRejected) as full:
            await client.submit("one-too-many", [40, 43], long)
        assert full.value.reason == RejectReason.QUEUE_FULL
        with pytest.raises(EngineRejected) as duplicate:
            await client.submit("waiting", [40, 42], long)
        assert duplicate.value.reason == RejectReason.DUPLICATE_ID
        assert client.state().running == 1 and client.state().queue_depth == 1
        assert await client.cancel("waiting") and await client.cancel("running")
        _, final = await read_all(running)
        assert final.reason == "cancelled"
        # The refused ids were not consumed.
        _, final = await read_all(await client.submit("one-too-many", [40, 43], SamplingParams(max_tokens=4)))
        assert isinstance(final, FinishedEvent)

    run(InProcessEngineClient(loaded, ServerConfig(max_batch_size=1, max_queue=1)), body)


@pytest.mark.timeout(60)
def test_state_metrics_and_close(loaded):
    client = InProcessEngineClient(loaded)
    assert client.state().state == EngineState.STOPPED

    async def body(client):
        assert client.state().state == EngineState.READY
        await read_all(await client.submit("counted", [50, 51], SamplingParams(max_tokens=8)))
        assert client.state().running == 0 and client.state().heartbeat_age < 0.5
        return client.metrics_registry.get_sample_value("dfastllm:denoising_steps_total")

    assert run(client, body) == 8

    async def after_close():
        with pytest.raises(EngineUnavailable):
            await client.submit("late", [50], SamplingParams(max_tokens=4))

    asyncio.run(after_close())


@pytest.mark.timeout(60)
def test_a_loop_that_ends_without_close_stops_the_engine_thread(loaded):
    # An application whose event loop ends with a request still running, without close().
    client = InProcessEngineClient(loaded)

    async def main():
        await client.start()
        await client.submit("orphaned", [50, 51], SamplingParams(max_tokens=400, block_length=4))

    asyncio.run(main())
    client._thread.join(10)
    assert not client._thread.is_alive()
    assert client.state().state == EngineState.STOPPED

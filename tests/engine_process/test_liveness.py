"""Readiness and admission share one definition of an alive engine: when the
engine process stops beating (SIGSTOP here; a hang or a crash alike),
/health/ready turns 503 no later than `submit` starts refusing, so a load
balancer stops sending traffic that would fail."""

import asyncio
import os
import signal
import time

import pytest
from falcon.testing import ASGIConductor

from dfastllm import SamplingParams
from dfastllm.engine.client import EngineClient, EngineUnavailable
from dfastllm.ipc.control import ENGINE_DEAD_AFTER_S
from server.app import create_app


async def submit_refused(client: EngineClient, request_id: str) -> bool:
    """Whether admission refuses at once (a submit the engine does not answer
    within 50 ms, as a stopped engine cannot, counts as not refused)."""
    try:
        stream = await asyncio.wait_for(client.submit(request_id, [100, 101], SamplingParams(max_tokens=2)), 0.05)
    except EngineUnavailable:
        return True
    except TimeoutError:
        return False
    await stream.aclose()
    return False


@pytest.mark.timeout(120)
def test_readiness_drops_no_later_than_admission_when_the_heartbeat_stalls(engine):
    config = engine.supervisor.config
    engine_pid = engine.supervisor.engine.pid

    async def main():
        client = EngineClient(engine.layout())
        async with ASGIConductor(create_app(config, client)) as http:
            assert (await http.simulate_get("/health/ready")).status_code == 200
            assert not await submit_refused(client, "alive")
            os.kill(engine_pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                for i in range(2000):
                    # Admission first, readiness after: the heartbeat only ages
                    # in between, so a refusal must find readiness dropped.
                    refused = await submit_refused(client, f"probe-{i}")
                    ready = (await http.simulate_get("/health/ready")).status_code
                    if refused:
                        assert ready == 503, "submit refuses while readiness still says 200"
                        break
                    await asyncio.sleep(0.01)
                else:
                    pytest.fail("submit never refused a stopped engine")
                waited = time.monotonic() - stopped_at
                assert ENGINE_DEAD_AFTER_S * 0.9 <= waited < ENGINE_DEAD_AFTER_S + 5
            finally:
                os.kill(engine_pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while (await http.simulate_get("/health/ready")).status_code != 200:
                assert time.monotonic() < deadline, "readiness did not return after SIGCONT"
                await asyncio.sleep(0.05)
            assert not await submit_refused(client, "alive-again")

    asyncio.run(main())

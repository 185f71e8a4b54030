"""A separate worker process for the engine-process tests:

    python client_process.py BASE_NAME generate REQUESTS_JSON  -> results JSON on stdout
    python client_process.py BASE_NAME hold REQUESTS_JSON      -> "admitted" line, then waits to be killed

REQUESTS_JSON: [{"id": str, "prompt": [int], "params": {SamplingParams fields}}]
It talks to the engine exactly as an HTTP worker does (EngineClient).
"""

import asyncio
import json
import sys

from dfastllm.engine.client import EngineClient, FinishedEvent, TokensEvent
from dfastllm.ipc import IpcLayout
from dfastllm.sampling_params import SamplingParams


async def generate(client: EngineClient, request: dict) -> dict:
    stream = await client.submit(request["id"], request["prompt"], SamplingParams(**request["params"]))
    tokens, final = [], None
    async for event in stream:
        if isinstance(event, TokensEvent):
            tokens += event.ids
        else:
            final = event
    if isinstance(final, FinishedEvent):
        return {"tokens": tokens, "finish_reason": final.reason, "completion_tokens": final.completion_tokens}
    return {"tokens": tokens, "error": final.message}


async def main(base_name: str, mode: str, requests_json: str) -> None:
    requests = json.loads(requests_json)
    client = EngineClient(IpcLayout.attach(base_name))
    await client.start()
    if mode == "generate":
        results = await asyncio.gather(*(generate(client, r) for r in requests))
        print(json.dumps({r["id"]: result for r, result in zip(requests, results)}), flush=True)
        await client.close()
    elif mode == "hold":
        for r in requests:  # the client keeps the open streams
            await client.submit(r["id"], r["prompt"], SamplingParams(**r["params"]))
        print("admitted", flush=True)
        await asyncio.sleep(3600)  # until the test kills this process
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))

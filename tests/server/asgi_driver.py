"""Run the app in this process (`running_app`: the real app over an
`InProcessEngineClient`, inside its ASGI lifespan) and drive it the way a
real HTTP client does.

falcon.testing's `simulate_*` signal a client disconnect as soon as the body
is sent, which our disconnect watch (rightly) answers by cancelling the
generation. This driver, built on falcon.testing's event emitter and
collector, stays connected until the response ends, or disconnects exactly
when a test says so.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from falcon.testing import ASGIConductor, ASGIRequestEventEmitter, ASGIResponseEventCollector, create_scope

from dfastllm.config import ServerConfig
from dfastllm.engine.client import InProcessEngineClient
from server.app import create_app

MODEL = "tiny"
MAX_MODEL_LEN = 512


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = {name: value for name, value in headers}
        self.body = body

    def json(self):
        return orjson.loads(self.body)

    def events(self) -> list:
        """SSE payloads in order: dicts, and the final "[DONE]"."""
        return parse_sse(self.body)


def parse_sse(body: bytes) -> list:
    events = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


class _Collector(ASGIResponseEventCollector):
    def __init__(self):
        super().__init__()
        self.done = asyncio.Event()
        self.chunk = asyncio.Event()

    async def collect(self, event):
        await super().collect(event)
        if event["type"] == "http.response.body":
            self.chunk.set()
            if not event.get("more_body", False):
                self.done.set()

    __call__ = collect


class _Emitter(ASGIRequestEventEmitter):
    """Counts the body bytes the app has taken."""

    def __init__(self, body: bytes, chunk_size: int):
        super().__init__(body, chunk_size=chunk_size)
        self.body_bytes_read = 0

    async def emit(self):
        event = await super().emit()
        self.body_bytes_read += len(event.get("body", b""))
        return event

    __call__ = emit


class InFlight:
    """A request whose response is still coming."""

    def __init__(self, task, emitter, collector):
        self.task = task
        self.emitter = emitter
        self.collector = collector

    @property
    def body(self) -> bytes:
        return b"".join(self.collector.body_chunks)

    async def wait_for(self, predicate, timeout: float = 30.0) -> None:
        """Until predicate(body so far) holds."""
        async def poll():
            while not predicate(self.body):
                self.collector.chunk.clear()
                await self.collector.chunk.wait()
        await asyncio.wait_for(poll(), timeout)

    async def disconnect(self) -> None:
        self.emitter.disconnect()
        await asyncio.wait_for(self.task, 30)

    async def finish(self, timeout: float = 60.0) -> Response:
        await asyncio.wait_for(self.collector.done.wait(), timeout)
        self.emitter.disconnect()  # the client closes after the response, as HTTP clients do
        await asyncio.wait_for(self.task, 30)
        return Response(self.collector.status, self.collector.headers, self.body)


class AsgiClient:
    def __init__(self, app):
        self.app = app

    def start(self, method: str, path: str, *, json=None, body: bytes | None = None, headers: dict | None = None,
              chunked: bool = False, chunk_size: int = 4096) -> InFlight:
        headers = dict(headers or {})
        if json is not None:
            body = orjson.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        body = body or b""
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        elif body:
            headers["Content-Length"] = str(len(body))
        scope = create_scope(path=path, method=method, headers=headers)
        emitter = _Emitter(body, chunk_size=chunk_size)
        collector = _Collector()
        task = asyncio.create_task(self.app(scope, emitter, collector))
        return InFlight(task, emitter, collector)

    async def request(self, method: str, path: str, **kwargs) -> Response:
        return await self.start(method, path, **kwargs).finish()

    async def get(self, path: str, **kwargs) -> Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs) -> Response:
        return await self.request("POST", path, **kwargs)

    async def delete(self, path: str, **kwargs) -> Response:
        return await self.request("DELETE", path, **kwargs)


class RunningApp(AsgiClient):
    def __init__(self, app, engine: InProcessEngineClient, config: ServerConfig):
        super().__init__(app)
        self.engine = engine
        self.config = config


@contextlib.asynccontextmanager
async def running_app(loaded_model, **config_fields):
    """The app over an in-process engine, started and stopped through its lifespan."""
    config = ServerConfig(model=loaded_model.path, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN,
                          **config_fields)
    engine = InProcessEngineClient(loaded_model, config)
    app = create_app(config, engine, tokenizer=loaded_model.tokenizer)
    async with ASGIConductor(app):
        yield RunningApp(app, engine, config)

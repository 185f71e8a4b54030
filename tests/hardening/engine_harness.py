"""What the engine-side hardening tests share: a real `dfastllm serve`
(supervisor, engine process, Granian with two workers) on a tiny checkpoint,
started with the flags and environment a test needs, with JSON logs."""

from __future__ import annotations

import serve_process
from serve_process import MODEL, ServeProcess, tiny_checkpoint


class EngineServer(ServeProcess):
    """`dfastllm serve --workers 2` with JSON logs in `directory/serve.log`,
    plus `env` in its environment and one intra-op thread, so that a shared
    2-core machine does not turn the engine's thread barriers into
    seconds-long stalls."""

    def __init__(self, directory, *args: str, model: str | None = None, env: dict[str, str] | None = None):
        super().__init__(model or tiny_checkpoint(directory), directory / "serve.log", "--served-model-name", MODEL,
                         "--workers", "2", "--log-format", "json", *args, env={"OMP_NUM_THREADS": "1", **(env or {})})


def completion(**fields) -> dict:
    """serve_process.completion, greedy unless `fields` say otherwise."""
    return serve_process.completion(**{"temperature": 0, **fields})

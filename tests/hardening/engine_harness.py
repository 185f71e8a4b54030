"""What the engine-side hardening tests share: a real `dfastllm serve`
(supervisor, engine process, Granian with two workers) on a tiny checkpoint,
started with the flags and environment a test needs, with JSON logs."""

from __future__ import annotations

from serve_process import ServeProcess

from dfastllm.testing import write_tiny_llada

MODEL = "tiny"


def tiny_checkpoint(directory) -> str:
    return write_tiny_llada(directory / "tiny", seed=5, max_sequence_length=512)


class EngineServer(ServeProcess):
    """`dfastllm serve --workers 2` with JSON logs in `directory/serve.log`,
    plus `env` in its environment and one intra-op thread, so that a shared
    2-core machine does not turn the engine's thread barriers into
    seconds-long stalls."""

    def __init__(self, directory, *args: str, model: str | None = None, env: dict[str, str] | None = None):
        super().__init__(model or tiny_checkpoint(directory), directory / "serve.log", "--served-model-name", MODEL,
                         "--workers", "2", "--log-format", "json", *args, env={"OMP_NUM_THREADS": "1", **(env or {})})


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **fields}

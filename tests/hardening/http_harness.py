"""What the HTTP hardening tests share: a real `dfastllm serve` with two
workers (tests/serve_process.py), clients that open a new connection per
request (so either worker may take each one), and readers for the metrics
page, the JSON log and the audit log."""

from __future__ import annotations

import hashlib

import httpx
import orjson
import serve_process
from serve_process import MODEL, ServeProcess, serving, tiny_checkpoint


def serving_tiny(directory, *args: str, env: dict[str, str] | None = None):
    """`serving` (tests/serve_process.py) a tiny checkpoint: 2 workers, JSON
    logs; `env`: extra environment variables for the server."""
    return serving(tiny_checkpoint(directory), str(directory / "serve.log"), "--served-model-name", MODEL,
                   "--workers", "2", "--no-warmup", "--log-format", "json", *args, env=env)


def fresh_connections(serve: ServeProcess, **kwargs) -> httpx.Client:
    """A client whose every request comes on a new connection: the two
    workers share the listening socket, so both take some."""
    kwargs.setdefault("timeout", 120)
    return httpx.Client(base_url=serve.base_url, limits=httpx.Limits(max_keepalive_connections=0), **kwargs)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def completion(**fields) -> dict:
    """serve_process.completion of 2 tokens unless `fields` say otherwise."""
    return serve_process.completion(**{"max_tokens": 2, **fields})



def json_lines(path) -> list[dict]:
    """Every line of a file, each parsed as one JSON object (fails on any other line)."""
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f.read().splitlines() if line.strip()]


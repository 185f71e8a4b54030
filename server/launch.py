"""How to run Granian for a ServerConfig: `config.workers` processes, each
importing `server.asgi:app`, which attaches to the engine in its lifespan
startup.

Every worker reads the configuration and the engine's shared-memory names
from the environment the supervisor prepared (DFASTLLM_CONFIG_JSON,
DFASTLLM_IPC_NAME) and PROMETHEUS_MULTIPROC_DIR, so that one /metrics shows
every process; `granian_argv` gives the command, the caller the environment.
"""

from __future__ import annotations

import subprocess
import sys

from dfastllm.config import ServerConfig

APP_TARGET = "server.asgi:app"
# On shutdown, how long a worker may take to end its streams before it is killed.
WORKERS_KILL_TIMEOUT_S = 15


def granian_argv(config: ServerConfig) -> list[str]:
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", config.host,
            "--port", str(config.port), "--workers", str(config.workers),
            # One event-loop thread per worker: the work is IO and tokenization.
            "--runtime-threads", "1", "--no-ws", "--respawn-failed-workers",
            "--workers-kill-timeout", str(WORKERS_KILL_TIMEOUT_S), "--log-level", config.log_level,
            APP_TARGET]


def run_granian(config: ServerConfig, env: dict[str, str] | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start Granian as a child process with `env` (the supervisor's)."""
    return subprocess.Popen(granian_argv(config), env=env, **popen_kwargs)

"""How to run Granian for a ServerConfig: `config.workers` processes, each
importing `server.asgi:app`, which attaches to the engine in its lifespan
startup.

`python -m server.launch` (the command `granian_argv` gives) runs
Granian's server in this interpreter rather than through its command line,
so that it can take a logging dictConfig: Granian's own lines and its
access log (one line per request, with the request id) then go through
dfastllm.log's formatter like every other line of the server: one JSON
object per line (role "http" in Granian's main process; the workers set
role "worker" when they import the app), or text with `--log-format text`.

Every worker reads the configuration and the engine's shared-memory names
from the environment the supervisor prepared (DFASTLLM_CONFIG_JSON,
DFASTLLM_IPC_NAME) and PROMETHEUS_MULTIPROC_DIR, so that one /metrics shows
every process; `granian_argv` gives the command, the caller the environment.

Before any worker starts, Granian's process fetches the served model's
config and tokenizer files once (a hub id: with retries, one line each); if
they cannot be had, every worker would fail alike, so it stops the server
at once with the reason (EXIT_CANNOT_START). Like the engine, it checks that
it imported the supervisor's `server` package, and when the supervisor died (the parent-death signal
stopped it) removes the run's shared-memory segments as it exits (see
`dfastllm.lifetime`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from dfastllm.config import ServerConfig
from dfastllm.ipc import ENV_NAME, remove_run_segments
from dfastllm.lifetime import EXIT_CANNOT_START, check_package_root, report_cannot_start, supervisor_gone

logger = logging.getLogger("dfastllm.http")

APP_TARGET = "server.asgi:app"
# On shutdown, how long a worker may take to end its streams before it is killed.
WORKERS_KILL_TIMEOUT_S = 15
ACCESS_LOG_FORMAT = '%(addr)s "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).3f ms'


def granian_argv(config: ServerConfig) -> list[str]:
    """The command; it takes the configuration from DFASTLLM_CONFIG_JSON."""
    return [sys.executable, "-m", "server.launch"]


def run_granian(config: ServerConfig, env: dict[str, str] | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start Granian as a child process with `env` (the supervisor's)."""
    return subprocess.Popen(granian_argv(config), env=env, **popen_kwargs)


def logging_config(config: ServerConfig, role: str = "http") -> dict:
    """Granian's logging dictConfig: its loggers and the root write through
    dfastllm.log's formatter to stderr."""
    formatter = "dfastllm.log.JsonFormatter" if config.log_format == "json" else "dfastllm.log.TextFormatter"
    # No level of their own: they follow the root's, which PATCH /admin/config sets.
    through_root = {"handlers": ["stderr"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"dfastllm": {"()": formatter, "role": role}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "dfastllm",
                                "stream": "ext://sys.stderr"}},
        "loggers": {"_granian": dict(through_root), "granian.access": dict(through_root)},
        "root": {"handlers": ["stderr"], "level": config.log_level.upper()},
    }


def serve(config: ServerConfig) -> None:
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    Server(APP_TARGET, address=config.host, port=config.port, interface=Interfaces.ASGI, workers=config.workers,
           # One event-loop thread per worker: the work is IO and tokenization.
           runtime_threads=1, websockets=False, respawn_failed_workers=True,
           workers_kill_timeout=WORKERS_KILL_TIMEOUT_S, log_level=LogLevels(config.log_level),
           log_dictconfig=logging_config(config), log_access=True, log_access_format=ACCESS_LOG_FORMAT).serve()


def fetch_model_files(config: ServerConfig) -> None:
    """The files every worker reads (a hub id's are downloaded to the hub
    cache); SystemExit(EXIT_CANNOT_START) with the reason if they cannot be had."""
    from dfastllm.checkpoints import CheckpointDownloadError
    from server.state import checkpoint_dir

    try:
        checkpoint_dir(config.model)
    except (CheckpointDownloadError, FileNotFoundError) as error:
        message = f"cannot serve {config.model}: {error}"
        logger.error("%s", message)
        report_cannot_start(message)
        raise SystemExit(EXIT_CANNOT_START) from None


def main() -> None:
    check_package_root("server", __file__)
    config = ServerConfig.from_process_env()
    from dfastllm.log import configure_logging

    configure_logging("http", level=config.log_level, fmt=config.log_format)
    try:
        fetch_model_files(config)
        serve(config)
    finally:
        if supervisor_gone():
            remove_run_segments(os.environ[ENV_NAME])


if __name__ == "__main__":
    main()

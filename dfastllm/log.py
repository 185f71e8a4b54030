"""Structured logging for every dfastllm process.

Each line is one JSON object: time, level, logger, message, process role and
pid, and the request id when the line was written while serving a request
(a context variable, so asyncio tasks keep their own). `--log-format text`
gives the same fields on one readable line. Prompt and completion text are
never logged at info level: callers log sizes, not contents.
"""

from __future__ import annotations

import contextvars
import datetime
import logging

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("dfastllm_request_id", default=None)

# Attributes every LogRecord has; anything else passed through `extra=` is
# emitted as a field of its own.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def fields(self, record: logging.LogRecord) -> dict:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "role": self.role,
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key != "request_id":
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return out

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.fields(record), default=str).decode()


class TextFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        head = f"{fields.pop('time')} {fields.pop('level').upper():7s} [{fields.pop('role')}:{fields.pop('pid')}] " \
               f"{fields.pop('logger')}: {fields.pop('message')}"
        exception = fields.pop("exception", None)
        tail = " ".join(f"{key}={value}" for key, value in fields.items())
        return "\n".join(part for part in (f"{head} {tail}".rstrip(), exception) if part)


def configure_logging(role: str, *, level: str = "info", fmt: str = "json") -> None:
    """Route every logger of this process (ours, Granian's, warnings) through
    one handler on stderr. Called once at process start."""
    formatter = JsonFormatter(role) if fmt == "json" else TextFormatter(role)
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("granian", "_granian", "granian.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.captureWarnings(True)


def set_log_level(level: str) -> None:
    """Runtime change (PATCH /admin/config)."""
    logging.getLogger().setLevel(level.upper())


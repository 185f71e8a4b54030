"""The one configuration object of `dfastllm serve`.

Every field is a command-line flag (`--max-batch-size`) and an environment
variable (`DFASTLLM_MAX_BATCH_SIZE`); a flag wins over the environment, the
environment over the default. The supervisor passes the resolved config to
the engine and the HTTP workers as JSON in `DFASTLLM_CONFIG_JSON`, so every
process sees the same values. Torch-free: the HTTP workers import it.

Fields marked `runtime=True` may be changed while the server runs through
`PATCH /admin/config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Sequence

ENV_PREFIX = "DFASTLLM_"
CONFIG_ENV = "DFASTLLM_CONFIG_JSON"


def _field(default, help: str, *, runtime: bool = False, choices: Sequence[str] | None = None):
    meta = {"help": help, "runtime": runtime, "choices": choices}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ServerConfig:
    # --- model and engine ---
    model: str | None = _field(None, "checkpoint directory or hub id; default: the embedded tiny model")
    served_model_name: str | None = _field(None, "model id clients send; default: the checkpoint folder name")
    device: str = _field("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = _field("auto", "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32",
                        choices=("auto", "bfloat16", "float16", "float32"))
    quantization: str = _field("none", "weights of the transformer blocks' projections: none (in dtype) or fp8 "
                               "(e4m3, a scale per output channel, torch._scaled_mm; LLaDA and Dream; refused "
                               "where it cannot run)",
                               choices=("none", "fp8"))
    kv_cache: str = _field("auto", "KV cache mode: none (exact reference), prefix or dual; auto: the family's "
                           "default (dual for LLaDA2, where it is exact; none for LLaDA and Dream)",
                           choices=("auto", "none", "prefix", "dual"))
    max_model_len: int | None = _field(None, "prompt + max_tokens limit; default: the model's max_sequence_length")
    max_batch_size: int = _field(32, "most requests decoded together in one denoising step")
    max_num_batched_tokens: int = _field(16384, "most query tokens one denoising step computes (a row at a block's "
                                         "first step costs its whole canvas, a cached row its block)")
    kv_cache_memory: float = _field(0.9, "KV page pool of kv_cache prefix/dual: bytes (> 1) or a fraction (<= 1) of "
                                    "the device memory free after loading the model")
    engine_threads: int | None = _field(None, "torch CPU threads of the engine process; default: the cores "
                                        "left after the HTTP workers (at least 1)")
    prefix_caching: bool = _field(True, "LLaDA2 with its block cache: requests that share a block-aligned prompt "
                                  "prefix share its KV pages (hits on /metrics)")
    cuda_graphs: bool = _field(True, "on CUDA with kv_cache dual or prefix, replay the cached steps' forward "
                               "as CUDA graphs")
    warmup: bool = _field(True, "run a short generation of the common shapes before reporting ready")
    seed: int | None = _field(None, "makes the seeds drawn for requests that give none reproducible; "
                              "default: fresh each start")
    # --- diffusion defaults for requests that do not say ---
    default_max_tokens: int = _field(128, "max_tokens when a request omits it", runtime=True)
    default_block_length: int = _field(32, "block_length when a request omits it", runtime=True)
    default_steps_per_token: float = _field(1.0, "steps = ceil(max_tokens * this) when a request omits steps",
                                            runtime=True)
    # --- HTTP ---
    host: str = _field("127.0.0.1", "address to bind")
    port: int = _field(8000, "port to bind")
    workers: int = _field(1, "HTTP worker processes")
    api_keys: list[str] = _field([], "accepted API keys (comma-separated in the environment); none: no auth")
    admin_keys: list[str] = _field([], "keys allowed on /admin/*")
    metrics_require_key: bool = _field(False, "require an API key on /metrics")
    cors_origins: list[str] = _field([], "origins allowed by CORS; none: no CORS headers")
    max_body_bytes: int = _field(1 << 20, "largest request body")
    body_timeout_s: float = _field(30.0, "a request body (declared or chunked) not all there this many seconds "
                                   "after its headers is answered 408 and its connection closed")
    max_prompt_chars: int = _field(64 * 1024, "longest prompt or message content, in characters")
    max_messages: int = _field(256, "most messages in a chat request")
    request_timeout_s: float = _field(600.0, "a request still running after this is cancelled", runtime=True)
    # --- protection ---
    rate_limit_per_minute: int = _field(0, "requests per minute per API key (else client address); 0: off",
                                        runtime=True)
    trusted_proxies: list[str] = _field([], "addresses whose X-Forwarded-For is believed")
    max_queue: int = _field(256, "most requests waiting for the engine; beyond it 503", runtime=True)
    max_queue_wait_s: float = _field(60.0, "shed new requests when the estimated wait exceeds this", runtime=True)
    dedup_window_s: float = _field(600.0, "a request id seen within this many seconds is refused with 409")
    circuit_failures: int = _field(5, "consecutive generation failures that open the circuit breaker")
    circuit_cooldown_s: float = _field(30.0, "seconds the circuit stays open before a half-open probe")
    load_retries: int = _field(3, "times the engine is started again after it failed before becoming ready "
                               "(loading the model, warm-up); then the supervisor exits non-zero")
    engine_stall_timeout_s: float = _field(300.0, "restart a ready engine whose loop has not come round for "
                                           "this long (hung, stopped); longer than any one denoising step. 0: never")
    drain_timeout_s: float = _field(30.0, "on SIGTERM, how long running requests may finish")
    # --- observability ---
    log_level: str = _field("info", "debug, info, warning or error", runtime=True,
                            choices=("debug", "info", "warning", "error"))
    log_format: str = _field("json", "json (one object per line) or text", choices=("json", "text"))
    audit_log: str | None = _field(None, "file for the audit log (one JSON line per request); '-' for stdout")
    tracing: str = _field("off", "OpenTelemetry exporter: off, console or otlp", choices=("off", "console", "otlp"))
    otlp_endpoint: str | None = _field(None, "OTLP/HTTP endpoint for --tracing otlp")

    # ---------------------------------------------------------------
    def resolved_engine_threads(self) -> int:
        """On a CPU the engine's forward competes with the HTTP workers for the
        same cores; oversubscribing them costs ~10x per step (measured on 2
        cores: 50 ms vs 4.9 ms). On CUDA torch's CPU threads barely matter."""
        return self.engine_threads or max(1, (os.cpu_count() or 1) - self.workers)

    @classmethod
    def runtime_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["runtime"])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        return cls(**json.loads(text))

    @classmethod
    def from_process_env(cls) -> ServerConfig:
        """The config the supervisor handed to this process (engine or worker)."""
        text = os.environ.get(CONFIG_ENV)
        return cls.from_json(text) if text else cls.from_args([])

    def with_absolute_paths(self) -> ServerConfig:
        """A copy whose local paths (a checkpoint directory, the audit log
        file) are absolute, resolved against this process's folder: the
        supervisor's children run in another (see dfastllm.lifetime)."""
        from dfastllm.checkpoints import is_local_path

        changes = {}
        if self.model is not None and is_local_path(os.path.expanduser(self.model)):
            changes["model"] = os.path.abspath(os.path.expanduser(self.model))
        if self.audit_log not in (None, "-"):
            changes["audit_log"] = os.path.abspath(os.path.expanduser(self.audit_log))
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """A flag per field; its help ends with the default and the environment variable."""
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _base_type(f.type)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            # A field without a default says in its help what happens then.
            shown = "" if default is None else f"default: {_show(default)}; "
            help = f"{f.metadata['help']} ({shown}env {ENV_PREFIX}{f.name.upper()})"
            if kind is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            elif kind is list:
                parser.add_argument(flag, action="append", default=None, help=f"repeatable; {help}")
            else:
                parser.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"], help=help)

    @classmethod
    def from_args(cls, argv: Sequence[str] | argparse.Namespace, environ: typing.Mapping[str, str] | None = None
                  ) -> ServerConfig:
        if not isinstance(argv, argparse.Namespace):
            parser = argparse.ArgumentParser()
            cls.add_arguments(parser)
            argv = parser.parse_args(list(argv))
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            given = getattr(argv, f.name, None)
            env = environ.get(ENV_PREFIX + f.name.upper())
            if given is not None:
                values[f.name] = given
            elif env is not None:
                values[f.name] = parse_value(f, env)
        config = cls(**values)
        config.validate()
        return config

    def updated(self, changes: typing.Mapping[str, object]) -> ServerConfig:
        """A copy with runtime fields changed; ValueError names the field at fault and nothing changes."""
        allowed = set(self.runtime_fields())
        for name in changes:
            if name not in allowed:
                raise ValueError(f"{name!r} is not a runtime-tunable setting (tunable: {sorted(allowed)})")
        fields = {f.name: f for f in dataclasses.fields(self)}
        values = {}
        for name, value in changes.items():
            kind = _base_type(fields[name].type)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (kind, int) if kind is float else kind):
                raise ValueError(f"{name} must be of type {kind.__name__}, got {value!r}")
            values[name] = kind(value)
        config = dataclasses.replace(self, **values)
        config.validate()
        return config

    def validate(self) -> None:
        for name, (bound, exclusive) in LOWER_BOUNDS.items():
            value = getattr(self, name)
            # "not >" rather than "<=": NaN fails both bounds.
            if value is not None and not (value > bound if exclusive else value >= bound):
                raise ValueError(f"{name} must be {'>' if exclusive else '>='} {bound}, got {value!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _base_type(f.type) is int and value is not None and value > INT_MAX:
                raise ValueError(f"{f.name} must be <= {INT_MAX}, got {value!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")


def _show(value) -> str:
    """A default as the user types it (flag or environment variable)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value) or "none"
    return str(value)


# Every integer setting fits in 64 bits, as the JSON of the configuration
# (between the processes, on /admin/config) carries it.
INT_MAX = 2**63 - 1
# The lower bound of each numeric field: name -> (bound, exclusive). One table
# for `validate()` and for the schema of PATCH /admin/config (None, where a
# field allows it, is not bounded).
LOWER_BOUNDS: dict[str, tuple[int, bool]] = {
    **{name: (1, False) for name in ("max_batch_size", "max_num_batched_tokens", "default_max_tokens",
                                     "default_block_length", "workers", "max_body_bytes", "max_prompt_chars",
                                     "max_messages", "max_queue", "circuit_failures", "engine_threads")},
    **{name: (0, True) for name in ("request_timeout_s", "max_queue_wait_s", "dedup_window_s",
                                    "circuit_cooldown_s", "drain_timeout_s", "default_steps_per_token", "body_timeout_s")},
    "engine_stall_timeout_s": (0, False),
    "rate_limit_per_minute": (0, False),
    "load_retries": (0, False),
    "kv_cache_memory": (0, True),
}


def _base_type(annotation) -> type:
    """`int | None` -> int, `list[str]` -> list (annotations are strings here)."""
    text = str(annotation).replace(" ", "")
    for name, kind in (("list", list), ("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    raise TypeError(f"unsupported config annotation {annotation!r}")


def parse_value(field: dataclasses.Field, text: str):
    kind = _base_type(field.type)
    if kind is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be true or false, got {text!r}")
    if text == "" and "None" in str(field.type):
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be {kind.__name__}, got {text!r}") from None

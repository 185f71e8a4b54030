"""Prometheus metrics of the HTTP workers, and the one `/metrics` page.

Every worker counts what the client sees (outcomes, tokens, latencies,
rejections, HTTP requests); the engine counts what only it knows (steps,
tokens per step, queue time, load) in `dfastllm.engine.metrics`. With
several processes, prometheus_client's multiprocess mode (the supervisor
sets PROMETHEUS_MULTIPROC_DIR before any process imports prometheus_client)
lets any worker render everyone's values on one page. The engine's gauges
that are not in that directory (an in-process engine, an engine that is
down) are filled in from the control block through `client.state()`, which
every worker can read without a message, along with the engine's state and
heartbeat age.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "dfastllm:"
# Latencies of whole requests reach the default request timeout (600 s).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, 1200.0)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0,
                120.0, 600.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclasses.dataclass
class RequestUsage:
    """The tokens of the one request a task serves, for its audit record."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


# Set by the audit middleware for each request; the token counters credit it,
# so the audit log and the metrics count the same tokens.
request_usage: contextvars.ContextVar[RequestUsage | None] = contextvars.ContextVar("dfastllm_request_usage",
                                                                                    default=None)


class _TokenCounter:
    """A Prometheus counter of tokens that also credits the current request."""

    def __init__(self, counter: Counter, field: str):
        self.counter = counter
        self.field = field

    def inc(self, amount: int = 1) -> None:
        self.counter.inc(amount)
        usage = request_usage.get()
        if usage is not None:
            setattr(usage, self.field, getattr(usage, self.field) + amount)


class HttpMetrics:
    """The worker's metric objects, in a registry of their own so that
    several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.success = Counter(PREFIX + "request_success_total", "Generations that finished normally",
                               ["finished_reason"], registry=r)
        self.failure = Counter(PREFIX + "request_failure_total", "Generations that failed after admission",
                               ["reason"], registry=r)
        # Same name as the engine's counter: the engine counts the cancellations
        # it decides itself, the workers those a client caused.
        self.cancelled = Counter(PREFIX + "request_cancelled_total", "Requests cancelled before they finished",
                                 ["reason"], registry=r)
        self.rejected = Counter(PREFIX + "request_rejected_total", "Generation requests refused before admission",
                                ["reason"], registry=r)
        self.prompt_tokens = _TokenCounter(Counter(PREFIX + "prompt_tokens_total", "Prompt tokens of admitted requests",
                                                   registry=r), "prompt_tokens")
        self.generation_tokens = _TokenCounter(Counter(PREFIX + "generation_tokens_total", "Tokens returned to clients",
                                                       registry=r), "completion_tokens")
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Request arrival to the first text sent",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between committed tokens of one choice (a burst's gap shared by its tokens)",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request arrival to the end of its generation",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests = Counter(PREFIX + "http_requests_total", "HTTP requests by route and status",
                                     ["method", "route", "status"], registry=r)
        # Shows that nothing grows per request: set after every request. For a
        # per-worker table, the largest worker's; for a shared one, its size.
        self.internal_entries = Gauge(PREFIX + "internal_entries",
                                      "Entries in a table that requests fill (largest over the live workers)",
                                      ["table"], registry=r, multiprocess_mode="livemax")

    def observe_tables(self, sizes: dict[str, int]) -> None:
        for table, size in sizes.items():
            self.internal_entries.labels(table).set(size)


class EngineStateCollector:
    """The engine's load gauges read from the control block, for the names
    that no process exported itself."""

    def __init__(self, engine_client, exported: set[str]):
        self.engine_client = engine_client
        self.exported = exported

    def collect(self):
        state = self.engine_client.state()
        gauges = {
            "num_requests_running": ("Requests in the running batch", state.running),
            "num_requests_waiting": ("Requests admitted but not yet running", state.queue_depth),
            "device_memory_used_bytes": ("Device memory held by the engine", state.device_memory_used),
            "circuit_state": ("The engine's circuit breaker: 0 closed, 1 open (refusing requests), 2 half-open",
                              int(state.circuit_state)),
        }
        for name, (doc, value) in gauges.items():
            if PREFIX + name not in self.exported:
                yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        yield GaugeMetricFamily(PREFIX + "engine_heartbeat_age_seconds", "Seconds since the engine's last heartbeat",
                                value=state.heartbeat_age)
        ready = GaugeMetricFamily(PREFIX + "engine_state", "1 for the engine's current state", labels=["state"])
        ready.add_metric([state.state.name.lower()], 1)
        yield ready


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def render(metrics: HttpMetrics, engine_client) -> bytes:
    """The Prometheus text of every process: all workers' and the engine's
    files in multiprocess mode, else this process's registry; then the
    engine's load gauges from the control block where nobody exported them."""
    if multiprocess_dir():
        source = CollectorRegistry()
        MultiProcessCollector(source)
    else:
        source = metrics.registry
    families = list(source.collect())
    families += EngineStateCollector(engine_client, {f.name for f in families}).collect()
    page = CollectorRegistry(auto_describe=False)
    page.register(_Families(families))
    return generate_latest(page)

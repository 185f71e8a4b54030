"""Engine-side Prometheus metrics.

The engine process and the HTTP workers are separate processes, so the
metrics go through prometheus_client's multiprocess mode: the supervisor
sets PROMETHEUS_MULTIPROC_DIR before starting anyone, every process writes
its values to files there, and `GET /metrics` in any worker merges them.
prometheus_client picks its value store when it is first imported, so this
module must be imported after the environment is set (the engine process
imports it from `main`).

Only what the engine alone knows is counted here: steps (and those
prepared ahead), tokens per step, queue time, load, KV pages and prefix
cache hits, device memory, the circuit breaker, and the cancellations the
engine decides itself (deadline, dead worker). Success, latency and
rejections are counted by the HTTP workers, which see the client's view.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "dfastllm:"

# Queue wait reaches minutes under overload; the last bucket is the default request timeout.
QUEUE_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      120.0, 300.0, 600.0)
TOKENS_PER_STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EngineMetrics:
    """The engine's metric objects; one per engine (process or in-process client).

    Each instance registers into its own registry so that several in-process
    engines (tests, embedding) never collide; in multiprocess mode the values
    reach `/metrics` through the shared directory whatever the registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # One engine process at a time: the most recent live value is the truth.
        self.running = Gauge(PREFIX + "num_requests_running", "Requests in the running batch",
                             registry=r, multiprocess_mode="livemostrecent")
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests admitted but not yet running",
                             registry=r, multiprocess_mode="livemostrecent")
        self.kv_pages_used = Gauge(PREFIX + "kv_cache_pages_used", "KV cache pages held by running requests",
                                   registry=r, multiprocess_mode="livemostrecent")
        self.kv_pages_free = Gauge(PREFIX + "kv_cache_pages_free", "KV cache pages free for new requests",
                                   registry=r, multiprocess_mode="livemostrecent")
        self.device_memory = Gauge(PREFIX + "device_memory_used_bytes",
                                   "Device memory held by the engine (process RSS on CPU)",
                                   registry=r, multiprocess_mode="livemostrecent")
        self.steps = Counter(PREFIX + "denoising_steps_total", "Denoising steps run over the batch", registry=r)
        self.steps_prepared_ahead = Counter(PREFIX + "denoising_steps_prepared_ahead_total",
                                            "Denoising steps launched on inputs the host prepared while the step "
                                            "before them ran", registry=r)
        self.step_time = Histogram(PREFIX + "denoising_step_seconds", "Wall time of one denoising step",
                                   buckets=STEP_TIME_BUCKETS, registry=r)
        self.tokens_per_step = Histogram(PREFIX + "tokens_per_step",
                                         "Tokens committed per request per denoising step (average over a "
                                         "finished request)", buckets=TOKENS_PER_STEP_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds",
                                    "Time from arrival at the engine to the first denoising step of the request",
                                    buckets=QUEUE_TIME_BUCKETS, registry=r)
        self.circuit_state = Gauge(PREFIX + "circuit_state",
                                   "The engine's circuit breaker: 0 closed, 1 open (refusing requests), 2 half-open",
                                   registry=r, multiprocess_mode="livemostrecent")
        self.circuit_opened = Counter(PREFIX + "circuit_opened_total",
                                      "Times repeated generation failures opened the circuit breaker", registry=r)
        # Same name and mode as the workers' gauge (server/metrics.py), tables of the engine's own.
        self.internal_entries = Gauge(PREFIX + "internal_entries",
                                      "Entries in a table that requests fill (largest over the live workers)",
                                      ["table"], registry=r, multiprocess_mode="livemax")
        self.prefix_cache_queries = Counter(PREFIX + "prefix_cache_queries_total",
                                            "Prompt tokens looked up in the prefix cache (LLaDA2: whole pages of "
                                            "whole blocks)", registry=r)
        self.prefix_cache_hits = Counter(PREFIX + "prefix_cache_hits_total",
                                         "Prompt tokens whose K/V the prefix cache held", registry=r)
        # Same name as the workers' counter: multiprocess mode sums by labels, and the
        # engine only uses the reasons it alone decides ("deadline", "worker_gone").
        self.cancelled = Counter(PREFIX + "request_cancelled_total", "Requests cancelled before they finished",
                                 ["reason"], registry=r)

    def observe_step(self, seconds: float, prepared_ahead: bool) -> None:
        self.steps.inc()
        if prepared_ahead:
            self.steps_prepared_ahead.inc()
        self.step_time.observe(seconds)

    def observe_finished(self, num_generated_tokens: int, num_steps: int) -> None:
        if num_steps > 0:
            self.tokens_per_step.observe(num_generated_tokens / num_steps)

    def observe_tables(self, sizes: dict[str, int]) -> None:
        for table, size in sizes.items():
            self.internal_entries.labels(table).set(size)

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def observe_prefix_cache(self, queries: int, hits: int) -> None:
        """Add the tokens queried and hit since the last call."""
        if queries:
            self.prefix_cache_queries.inc(queries)
        if hits:
            self.prefix_cache_hits.inc(hits)

    def set_kv_pages(self, used: int, free: int) -> None:
        self.kv_pages_used.set(used)
        self.kv_pages_free.set(free)

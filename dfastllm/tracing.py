"""OpenTelemetry tracing across the worker and engine processes.

Off by default, and then free: no provider is installed and every helper
returns at once. With `--tracing console|otlp`, the worker opens one span per
HTTP request (honouring the client's W3C `traceparent`), puts that span's
`traceparent` into the SUBMIT message, and the engine records child spans for
queue wait and generation under it, so one trace spans both processes.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

_tracer = None  # an opentelemetry Tracer once setup_tracing() enabled tracing


def setup_tracing(mode: str, *, service_name: str, endpoint: str | None = None) -> None:
    """Install a tracer provider for this process; `mode` is off, console or otlp."""
    global _tracer
    if mode == "off":
        _tracer = None
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if mode == "console":
        exporter = ConsoleSpanExporter()
    elif mode == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    else:
        raise ValueError(f"tracing must be off, console or otlp, got {mode!r}")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("dfastllm")
    log.info("tracing enabled", extra={"exporter": mode, "endpoint": endpoint})


def enabled() -> bool:
    return _tracer is not None


def shutdown_tracing() -> None:
    """Flush spans still buffered (called at process exit)."""
    if _tracer is not None:
        from opentelemetry import trace

        trace.get_tracer_provider().shutdown()


def _context_from(traceparent: str | None):
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


@contextlib.contextmanager
def request_span(name: str, *, traceparent: str | None = None, attributes: dict | None = None):
    """A span for one HTTP request, child of the client's `traceparent` if
    any. Yields the span (None when tracing is off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, context=_context_from(traceparent), attributes=attributes) as span:
        yield span


def current_traceparent() -> str:
    """The `traceparent` of the current span, to carry across the ring ('' when off)."""
    if _tracer is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


def record_span(name: str, *, traceparent: str, start_ns: int, end_ns: int, attributes: dict | None = None) -> None:
    """Record a finished span with explicit wall-clock times (ns since the
    epoch) under `traceparent`: the engine's queue-wait and generation spans."""
    if _tracer is None or not traceparent:
        return
    span = _tracer.start_span(name, context=_context_from(traceparent), start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)

"""OpenTelemetry across the processes of a real `dfastllm serve` (2
workers) exporting OTLP/HTTP to a collector this test runs: one trace per
request, under the client's W3C traceparent, with the worker's request span
and the engine's queue and generation spans as its children."""

from __future__ import annotations

import gzip
import http.server
import secrets
import socket
import threading
import zlib

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                        ExportTraceServiceResponse)

from engine_harness import EngineServer, completion
from serve_process import free_port, wait_for

pytestmark = pytest.mark.timeout(120)


class Collector(http.server.ThreadingHTTPServer):
    """An in-memory OTLP/HTTP trace receiver: POST /v1/traces with a protobuf
    ExportTraceServiceRequest; keeps one dict per span."""

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _CollectorHandler)
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        encoding = self.headers.get("Content-Encoding")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    spans.append(dict(service=service, name=span.name, trace_id=span.trace_id.hex(),
                                      span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                                      start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                                      attributes=attributes))
        with self.server.lock:
            self.server.spans.extend(spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def collector():
    server = Collector(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, collector):
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    serve = EngineServer(tmp_path_factory.mktemp("tracing"), "--no-warmup", "--tracing", "otlp",
                         "--otlp-endpoint", endpoint, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}).wait_ready()
    yield serve
    assert serve.stop() == 0, serve.log_tail()


def _one_trace(collector: Collector, trace_id: str) -> dict[str, dict]:
    """The trace's spans by name, once the worker's and the engine's are in."""
    expected = {"engine.queue", "engine.generate"}
    assert wait_for(lambda: expected <= {s["name"] for s in collector.trace(trace_id)}
                    and any(s["service"] == "dfastllm-worker" for s in collector.trace(trace_id)), timeout=60), \
        f"spans of trace {trace_id}: {collector.trace(trace_id)}"
    spans = collector.trace(trace_id)
    by_name = {s["name"]: s for s in spans}
    assert len(by_name) == len(spans) == 3, spans  # one of each, no stray spans in the client's trace
    return by_name


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", completion(max_tokens=8, steps=8)),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                              "stream": True}),
], ids=["completion", "streamed-chat"])
def test_one_trace_spans_the_worker_and_the_engine_under_the_clients_traceparent(server, collector, path, body):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(server.base_url + path, json=body, timeout=60,
                          headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert response.status_code == 200, response.text

    spans = _one_trace(collector, trace_id)
    request = spans[f"POST {path}"]
    assert request["service"] == "dfastllm-worker"
    assert request["parent_span_id"] == client_span
    for name in ("engine.queue", "engine.generate"):
        assert spans[name]["service"] == "dfastllm-engine"
        assert spans[name]["parent_span_id"] == request["span_id"]
        assert request["start_ns"] <= spans[name]["start_ns"] <= spans[name]["end_ns"] <= request["end_ns"]
    assert spans["engine.queue"]["end_ns"] == spans["engine.generate"]["start_ns"]
    generate = spans["engine.generate"]["attributes"]
    assert generate["completion_tokens"] == 8 and generate["steps"] == 8 and generate["prompt_tokens"] > 0


def test_a_request_without_traceparent_starts_its_own_trace(server, collector):
    request_id = f"untraced-{secrets.token_hex(4)}"
    response = httpx.post(server.base_url + "/v1/completions", json=completion(), timeout=60,
                          headers={"X-Request-ID": request_id})
    assert response.status_code == 200, response.text
    assert wait_for(lambda: any(s["attributes"].get("dfastllm.request_id") == request_id
                                for s in collector.spans), timeout=60)
    root = next(s for s in collector.spans if s["attributes"].get("dfastllm.request_id") == request_id)
    assert root["parent_span_id"] == ""
    spans = _one_trace(collector, root["trace_id"])
    assert spans["engine.generate"]["parent_span_id"] == root["span_id"]


def _admitted_prompt_tokens(server) -> float:
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    return float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("dfastllm:prompt_tokens_total ")))


def test_the_request_span_ends_when_the_client_leaves_before_the_first_byte(server, collector):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    body = orjson.dumps(completion(max_tokens=480, steps=480, block_length=4, ignore_eos=True, stream=True))
    admitted = _admitted_prompt_tokens(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"traceparent: 00-{trace_id}-{client_span}-01\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        # Leave once the request is admitted: a client that closes at once
        # sometimes never reaches the app at all (Granian sees the end of the
        # connection before it dispatches the request, so there is no span).
        assert wait_for(lambda: _admitted_prompt_tokens(server) > admitted, timeout=30)
    # gone without reading a byte: the worker's span must still end (and be exported)
    assert wait_for(lambda: any(s["name"] == "POST /v1/completions" for s in collector.trace(trace_id)), timeout=60), \
        collector.trace(trace_id)

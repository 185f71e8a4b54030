"""The contract against the real server: `dfastllm serve` (supervisor,
engine process, 2 Granian workers) on a tiny checkpoint, spoken to over TCP
with httpx, raw sockets and the official `openai` client. One test per row
of HTTP_CONTRACT.md's tables, plus true streaming, disconnects, oversized
bodies and invalid inputs that must not reach the engine."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import openai
import orjson
import pytest

from serve_process import MODEL, completion, metric, parse_metrics, serving, tiny_checkpoint, wait_for
from server import responses

KEY = "test-key"
MAX_BODY = 64 * 1024  # configured small, so the 413 tests move little data
AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("blackbox")
    with serving(tiny_checkpoint(directory), str(directory / "serve.log"), "--served-model-name", MODEL,
                 "--workers", "2", "--api-keys", KEY, "--max-body-bytes", str(MAX_BODY), "--no-warmup") as serve:
        yield serve


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(http) -> dict[str, float]:
    """/metrics through the test's authenticated client."""
    return parse_metrics(http.get("/metrics").text)


# ---------------------------------------------------------------- endpoints

def test_completions_with_the_openai_client(oai):
    result = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True})
    assert result.object == "text_completion" and result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 8
    pieces = list(oai.completions.create(model=MODEL, prompt="Hello", max_tokens=8, stream=True,
                                         extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in pieces) == result.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_chat_completions_with_the_openai_client(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    result = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert result.choices[0].message.role == "assistant" and result.id.startswith("chatcmpl-")
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == result.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == result.usage.completion_tokens


def test_finish_reasons_and_usage(oai):
    whole = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=32,
                                   extra_body={"ignore_eos": True}).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    stopped = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=32, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == whole[:whole.index(stop)]
    # usage counts the tokens returned (up to the stop), not max_tokens
    assert 0 < stopped.usage.completion_tokens < 32
    natural = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=400)  # EOS, or the length
    assert (natural.choices[0].finish_reason == "stop") == (natural.usage.completion_tokens < 400)


def test_models_with_the_openai_client(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 512
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_delete_cancels_on_whichever_worker(server, http):
    # Each DELETE comes on a new connection, which either worker may take: all must work.
    for round_ in range(4):
        rid = f"cancel-me-{round_}-{time.time_ns()}"
        body = completion(max_tokens=480, steps=480, block_length=4, ignore_eos=True, stream=True)
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as streamer:
            with streamer.stream("POST", "/v1/completions", json=body, headers={"X-Request-ID": rid}) as resp:
                lines = resp.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                with httpx.Client(base_url=server.base_url, headers=AUTH) as other:
                    cancel = other.delete(f"/v1/requests/{rid}")
                assert cancel.status_code == 200, cancel.text
                events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[-2])["choices"][0]["finish_reason"] == "cancelled"
        gone = http.delete(f"/v1/requests/{rid}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "request_not_found"


def test_tokenize_and_detokenize(http):
    tokens = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert http.post("/v1/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "Hello world"


def test_probes_and_version(server):
    for path in ("/health/live", "/health/ready", "/health", "/version"):
        assert httpx.get(server.base_url + path).status_code == 200, path  # no key needed
    assert httpx.get(server.base_url + "/health/ready").json()["state"] == "ready"
    version = responses.VersionInfo.model_validate(httpx.get(server.base_url + "/version").json())
    assert version.api_versions == ["1"]


def test_metrics_of_every_process_on_one_page(server, http):
    http.post("/v1/completions", json=completion(stream=True))
    text = httpx.get(server.base_url + "/metrics").text  # no key needed by default
    for name in ("num_requests_running", "num_requests_waiting", "device_memory_used_bytes",
                 "request_success_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "denoising_steps_total", "tokens_per_step", "http_requests_total",
                 "kv_cache_pages_used", "kv_cache_pages_free"):
        assert f"dfastllm:{name}" in text, name
    assert 'dfastllm:e2e_request_latency_seconds_bucket{le="600.0"}' in text
    # Requests served by both workers add up on one page, whichever worker renders it.
    before = metric(metrics(http), "dfastllm:http_requests_total")
    for _ in range(6):
        httpx.get(server.base_url + "/health/live")  # a new connection each: both workers serve some
    after = [metric(metrics(http), "dfastllm:http_requests_total") for _ in range(4)]
    assert all(a >= before + 6 for a in after)


def test_admin_needs_an_admin_key(http):
    resp = http.get("/admin/config")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"


# ----------------------------------------------------- identity and versions

def test_request_ids_and_versions(http):
    resp = http.post("/v1/completions", json=completion(), headers={"X-Request-ID": f"id-{time.time_ns()}"})
    assert resp.json()["id"] == "cmpl-" + resp.headers["x-request-id"]
    assert resp.headers["x-api-version"] == "1"
    assert len(http.get("/v1/models").headers["x-request-id"]) == 32
    resp = http.get("/v1/models", headers={"X-API-Version": "7"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_api_version"


def test_reused_request_id_is_refused_by_any_worker(server):
    rid = f"dup-{time.time_ns()}"
    # A refused request does not consume its id ...
    with httpx.Client(base_url=server.base_url, headers=AUTH) as first:
        assert first.post("/v1/completions", json=completion(n=0), headers={"X-Request-ID": rid}).status_code == 400
        assert first.post("/v1/completions", json=completion(), headers={"X-Request-ID": rid}).status_code == 200
    # ... an admitted one does, on every worker (fresh connections land on either).
    for _ in range(4):
        with httpx.Client(base_url=server.base_url, headers=AUTH) as again:
            resp = again.post("/v1/completions", json=completion(), headers={"X-Request-ID": rid})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "duplicate_request_id"


# --------------------------------------------------------------------- errors

ERROR_ROWS = {
    "400 malformed JSON": ("POST", "/v1/completions", {"content": b"{nope"}, 400, "invalid_json"),
    "400 unknown field": ("POST", "/v1/completions", {"json": completion(best_friend=1)}, 400, "unknown_parameter"),
    "400 context length": ("POST", "/v1/completions", {"json": completion(max_tokens=512)}, 400,
                           "context_length_exceeded"),
    "401 missing key": ("GET", "/v1/models", {"headers": {"Authorization": ""}}, 401, "invalid_api_key"),
    "401 wrong key": ("GET", "/v1/models", {"headers": {"Authorization": "Bearer wrong"}}, 401, "invalid_api_key"),
    "403 admin": ("GET", "/admin/config", {}, 403, "forbidden"),
    "404 route": ("GET", "/v1/nothing", {}, 404, "route_not_found"),
    "404 model": ("POST", "/v1/completions", {"json": completion(model="other")}, 404, "model_not_found"),
    "404 request id": ("DELETE", "/v1/requests/unknown-id", {}, 404, "request_not_found"),
    "405 method": ("PUT", "/v1/completions", {}, 405, "method_not_allowed"),
}


@pytest.mark.parametrize("row", list(ERROR_ROWS))
def test_error_rows(http, row):
    method, path, kwargs, status, code = ERROR_ROWS[row]
    resp = http.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    body = responses.ErrorResponse.model_validate(resp.json())
    assert body.error.code == code and "Traceback" not in resp.text
    assert resp.headers["x-request-id"] and resp.headers["x-api-version"] == "1"


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or (b"content-length" in data.lower() and not data.endswith(b"}")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_413_declared_length_is_refused_before_the_body(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {MAX_BODY * 16}\r\n\r\n".encode())
        reply = _read_response(sock, timeout=10)  # not a byte of the body was sent
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"request_too_large"' in reply


def test_413_chunked_body_is_cut_at_the_limit(server):
    total = 64 * 1024 * 1024
    sent = {"bytes": 0, "error": None}
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())

    def send_body():
        chunk = b"a" * 16384
        try:
            while sent["bytes"] < total:
                sock.sendall(b"4000\r\n" + chunk + b"\r\n")
                sent["bytes"] += len(chunk)
        except OSError as error:
            sent["error"] = error

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        reply = _read_response(sock, timeout=20)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b'"request_too_large"' in reply
        sender.join(20)
        # The server answered and closed long before the client could send the 64 MiB.
        assert sent["error"] is not None and sent["bytes"] < total
    finally:
        sock.close()


def test_valid_bodies_near_the_limit_pass(http):
    prompt = "word " * ((MAX_BODY - 200) // 5)
    resp = http.post("/v1/tokenize", json={"prompt": prompt[: 64 * 1024]})
    assert resp.status_code == 200


# ----------------------------------------------------------------- validation

VALIDATION_ROWS = {
    "model": completion(model="nope"),
    "prompt": completion(prompt=""),
    "messages": {"model": MODEL, "messages": []},
    "max_tokens": completion(max_tokens=0),
    "max_completion_tokens": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0},
    "context length": completion(max_tokens=600),
    "temperature": completion(temperature=2.5),
    "top_p": completion(top_p=0),
    "n": completion(n=9),
    "stop": completion(stop=["a", "b", "c", "d", "e"]),
    "seed": completion(seed=-1),
    "stream_options": completion(stream_options={"include_usage": True}),
    "steps": completion(steps=5),
    "block_length": completion(block_length=0),
    "remasking": completion(remasking="entropy"),
    "threshold": completion(threshold=0),
    "unknown field": completion(color="red"),
    "unsupported value": completion(logprobs=3),
}


@pytest.mark.parametrize("row", list(VALIDATION_ROWS))
def test_invalid_inputs_never_reach_the_engine(http, row):
    body = VALIDATION_ROWS[row]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    engine_counters = ("dfastllm:request_queue_time_seconds_count", "dfastllm:denoising_steps_total",
                       "dfastllm:prompt_tokens_total", "dfastllm:tokens_per_step_count")
    before = metrics(http)
    resp = http.post(path, json=body)
    assert resp.status_code in (400, 404), resp.text
    after = metrics(http)
    for name in engine_counters:
        assert metric(after, name) == metric(before, name), name
    assert metric(after, "dfastllm:request_rejected_total") == metric(before, "dfastllm:request_rejected_total") + 1


# ------------------------------------------------------------------ streaming

def test_true_streaming_first_chunk_after_a_fraction_of_the_time(http):
    # 8 blocks of 56 tokens, one token per step: the first block is final after
    # 1/8 of the steps. Long enough (seconds even on an idle machine) that the
    # fixed cost of a request (HTTP, tokenizing, admission) stays small beside it.
    body = completion(max_tokens=448, block_length=56, steps=448, ignore_eos=True, stream=True)
    started = time.perf_counter()
    first = None
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: {") and first is None and orjson.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    assert first is not None and first < total / 4, (first, total)


def test_disconnect_mid_stream_cancels_the_engine_request(server, http):
    cancelled = 'dfastllm:request_cancelled_total{reason="client_disconnect"}'
    assert wait_for(lambda: metric(metrics(http), "dfastllm:num_requests_running") == 0)
    before = metric(metrics(http), cancelled)
    body = completion(max_tokens=480, steps=480, block_length=4, ignore_eos=True, stream=True)
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            # Keep the line iterator: a dropped one closes httpx's stream, and
            # with it the connection, at once (the disconnect would then race
            # the check below instead of following it).
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            # The engine publishes its gauges once per loop: wait for this step's.
            assert wait_for(lambda: metric(metrics(http), "dfastllm:num_requests_running") == 1)
            assert metric(metrics(http), cancelled) == before
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: metric(metrics(http), cancelled) == before + 1)
    assert wait_for(lambda: metric(metrics(http), "dfastllm:num_requests_running") == 0)


def test_disconnect_while_waiting_for_a_non_streamed_answer_cancels(server, http):
    cancelled = 'dfastllm:request_cancelled_total{reason="client_disconnect"}'
    before = metric(metrics(http), cancelled)
    body = orjson.dumps(completion(max_tokens=480, steps=480, block_length=4, ignore_eos=True))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_for(lambda: metric(metrics(http), "dfastllm:num_requests_running") == 1)
    assert wait_for(lambda: metric(metrics(http), cancelled) == before + 1)
    assert wait_for(lambda: metric(metrics(http), "dfastllm:num_requests_running") == 0)


def _engine_pid(server) -> int:
    with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"dfastllm.engine.process" in f.read():
                return pid
    raise AssertionError("no engine process under the supervisor")


def test_engine_death_mid_stream_ends_the_stream_and_readiness(server, http):
    """Last in this module: the supervisor restarts the engine; the test waits for it."""
    body = completion(max_tokens=480, steps=480, block_length=4, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        os.kill(_engine_pid(server), signal.SIGKILL)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    # An error after the first byte goes into the stream, which still ends with [DONE].
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])
    assert responses.ErrorResponse.model_validate(error).error.code == "engine_unavailable"
    assert orjson.loads(events[-3])["choices"][0]["finish_reason"] == "error"
    ready = httpx.get(server.base_url + "/health/ready")
    assert ready.status_code == 503 and ready.json()["state"] != "ready"
    refused = http.post("/v1/completions", json=completion())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
    assert refused.headers["retry-after"]
    assert httpx.get(server.base_url + "/health/live").status_code == 200
    server.wait_ready(timeout=60)
    assert http.post("/v1/completions", json=completion()).status_code == 200

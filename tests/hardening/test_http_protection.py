"""Against a real `dfastllm serve` (supervisor, engine, 2 Granian workers)
without API keys, so clients are told apart by address, with 127.0.0.1 as
a trusted proxy (its X-Forwarded-For names the client) and a batch of 2
(so a few long requests make a queue): the rate limit shared by the
workers, load shedding and recovery, and state that stays bounded under
thousands of requests."""

from __future__ import annotations

import concurrent.futures
import itertools
import socket
import threading
import time

import httpx
import pytest

from dfastllm.ipc.rate_limit import DEFAULT_CAPACITY
from http_harness import completion, fresh_connections, json_lines, serving_tiny
from serve_process import metric, metrics, wait_for

ADMIN = "admin-key"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("protection")
    with serving_tiny(directory, "--admin-keys", ADMIN, "--trusted-proxies", "127.0.0.1",
                      "--max-batch-size", "2", "--audit-log", str(directory / "audit.jsonl")) as serve:
        serve.audit_path = directory / "audit.jsonl"
        yield serve


@pytest.fixture(scope="module")
def http(server):
    with fresh_connections(server) as client:
        yield client


@pytest.fixture
def settings(server):
    """PATCH /admin/config for one test; the previous values come back after it."""
    admin = fresh_connections(server, headers={"Authorization": f"Bearer {ADMIN}"})
    before = admin.get("/admin/config").json()["config"]

    def change(**fields):
        resp = admin.patch("/admin/config", json=fields)
        assert resp.status_code == 200, resp.text
        return resp.json()

    yield change
    assert admin.patch("/admin/config", json=before).status_code == 200
    admin.close()


def audit_records(server) -> list[dict]:
    return json_lines(server.audit_path)


def forwarded(address: str) -> dict:
    return {"X-Forwarded-For": f"203.0.113.200, {address}"}


# -------------------------------------------------------------- rate limit

def test_the_rate_limit_is_shared_by_both_workers(server, http, settings):
    settings(rate_limit_per_minute=10)
    client = forwarded("198.51.100.7")
    statuses = [http.post("/v1/tokenize", json={"prompt": "hi"}, headers=client) for _ in range(24)]
    assert [r.status_code for r in statuses] == [200] * 10 + [429] * 14
    refused = statuses[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 65
    # Both workers took some of the client's requests, and together admitted 10.
    assert {r["pid"] for r in audit_records(server) if r["client"] == "198.51.100.7"} == server.worker_pids()
    # Another client is not affected; generation routes count too.
    other = forwarded("198.51.100.8")
    assert http.post("/v1/completions", json=completion(), headers=other).status_code == 200
    # Concurrent requests from both workers at once never get past the limit either.
    burst = forwarded("198.51.100.9")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: http.post("/v1/tokenize", json={"prompt": "x"}, headers=burst).status_code,
                              range(40)))
    assert 8 <= codes.count(200) <= 10 and codes.count(429) == 40 - codes.count(200)
    # Probes, metrics and the admin API are never limited.
    for _ in range(12):
        assert httpx.get(server.base_url + "/health/live").status_code == 200


def test_forwarded_for_is_believed_only_from_trusted_proxies(server, settings):
    settings(rate_limit_per_minute=5)
    # 127.0.0.2 is not a trusted proxy: whatever it forwards, it is one client.
    untrusted = httpx.Client(base_url=server.base_url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with untrusted:
        codes = [untrusted.post("/v1/tokenize", json={"prompt": "a"}, headers=forwarded(f"192.0.2.{i}")).status_code
                 for i in range(8)]
    assert codes == [200] * 5 + [429] * 3
    clients = {r["client"] for r in audit_records(server) if r.get("path") == "/v1/tokenize"}
    assert "127.0.0.2" in clients and not any(c.startswith("192.0.2.") for c in clients)


# ---------------------------------------------------------- load shedding

def test_overload_is_shed_with_retry_after_and_recovers(server, http, settings):
    # Long enough (256 steps, 1 s or more even on an idle machine) for a queue to be seen.
    long_request = completion(max_tokens=256, steps=256, block_length=32, ignore_eos=True)
    assert http.post("/v1/completions", json=long_request).status_code == 200  # a service time to estimate with
    results = []

    def send():
        results.append(http.post("/v1/completions", json=long_request).status_code)

    senders = [threading.Thread(target=send) for _ in range(5)]
    for sender in senders:
        sender.start()
    try:
        # Batch 2: three wait, an estimated wait of 1.5 recent service times
        # (the average includes the module's earlier, short generations too),
        # far over 1 ms.
        assert wait_for(lambda: metric(metrics(server), "dfastllm:num_requests_waiting") >= 3, timeout=30)
        settings(max_queue_wait_s=0.001)
        shed_id = f"shed-{time.time_ns()}"
        shed = http.post("/v1/completions", json=completion(), headers={"X-Request-ID": shed_id})
        assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
        assert int(shed.headers["retry-after"]) >= 1
        # Everything but generation still answers.
        assert httpx.get(server.base_url + "/health/live").status_code == 200
        assert httpx.get(server.base_url + "/health/ready").status_code == 200
        assert httpx.get(server.base_url + "/admin/config", headers={"Authorization": f"Bearer {ADMIN}"}
                         ).status_code == 200
        assert http.post("/v1/tokenize", json={"prompt": "hi"}).status_code == 200
        assert 'dfastllm:request_rejected_total{reason="overloaded"}' in httpx.get(server.base_url + "/metrics").text
    finally:
        for sender in senders:
            sender.join(120)
    assert results == [200] * 5  # admitted work was never dropped
    # Recovered: the queue is empty, and the shed request's id was not consumed.
    assert http.post("/v1/completions", json=completion(), headers={"X-Request-ID": shed_id}).status_code == 200


# ---------------------------------------------------------- bounded state

def test_state_stays_bounded_under_thousands_of_requests(server, settings):
    settings(rate_limit_per_minute=1_000_000)  # on, so that every client takes a table entry
    before = metrics(server)
    addresses = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in itertools.count(1 << 16))
    lock = threading.Lock()

    def next_address() -> str:
        with lock:
            return next(addresses)

    def tokenize_many(n: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:  # keep-alive: one worker each
            for i in range(n):
                headers = {**forwarded(next_address()), "X-Request-ID": f"tok-{time.time_ns()}-{i}"}
                assert client.post("/v1/tokenize", json={"prompt": "hi"}, headers=headers).status_code == 200

    def generate_many(n: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for i in range(n):
                headers = {**forwarded(next_address()), "X-Request-ID": f"gen-{time.time_ns()}-{i}"}
                if i % 5 == 0:  # some leave mid-stream: their cancels must not pile up either
                    with client.stream("POST", "/v1/completions", headers=headers,
                                       json=completion(max_tokens=32, steps=32, stream=True, ignore_eos=True)) as r:
                        # The dropped line iterator closes the connection at once: the client leaves here.
                        next(line for line in r.iter_lines() if line.startswith("data: {"))
                else:
                    assert client.post("/v1/completions", json=completion(max_tokens=1),
                                       headers=headers).status_code == 200

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(tokenize_many, 750) for _ in range(4)] + [pool.submit(generate_many, 40) for _ in range(2)]
        for job in jobs:
            job.result()
    # Methods are client input too: they must not become new metric series.
    for i in range(30):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(f"X{i}Y /health/live HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(64).startswith(b"HTTP/1.1 4")

    def settled() -> bool:
        # A few requests on fresh connections, so that both workers refresh their gauges.
        for _ in range(4):
            httpx.get(server.base_url + "/health/live")
        values = metrics(server)
        return all(values.get(f'dfastllm:internal_entries{{table="{t}"}}') == 0
                   for t in ("client_streams", "client_cancel_acks", "client_background_tasks"))

    assert wait_for(settled, timeout=30), {k: v for k, v in metrics(server).items() if "internal" in k}
    after = metrics(server)
    # One rate-limit entry per client (3,080 new ones), not per request, within the fixed table.
    clients = after['dfastllm:internal_entries{table="rate_limit_clients"}']
    assert clients - before.get('dfastllm:internal_entries{table="rate_limit_clients"}', 0) == 3000 + 80
    assert clients <= DEFAULT_CAPACITY
    new_series = {k for k in after if k.startswith("dfastllm:http_requests_total")} - set(before)
    assert len(new_series) <= 12, new_series


def test_latency_histograms_reach_ten_minutes(server):
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds"):
        assert f'dfastllm:{name}_bucket{{le="600.0"}}' in text, name

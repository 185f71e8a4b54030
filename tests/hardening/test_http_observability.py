"""Against a real `dfastllm serve` (supervisor, engine, 2 Granian workers)
with API keys, an admin key and an audit log: structured logs, the audit
log, runtime configuration through /admin/config, API versions, request-id
de-duplication around refusals, and the HTTP side of a drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import orjson
import pytest

from dfastllm.config import ServerConfig
from http_harness import completion, fresh_connections, json_lines, key_id, serving_tiny
from serve_process import MODEL, wait_for
from server.resources.admin import AdminConfigResponse

KEY, KEY2, ADMIN = "key-one", "key-two", "admin-key"
MAX_BODY = 64 * 1024
SECRET_PROMPT = "zebra-quartz-secret-prompt"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("observability")
    with serving_tiny(directory, "--api-keys", KEY, "--api-keys", KEY2, "--admin-keys", ADMIN,
                      "--audit-log", str(directory / "audit.jsonl"), "--max-body-bytes", str(MAX_BODY)) as serve:
        serve.audit_path = directory / "audit.jsonl"
        yield serve


@pytest.fixture(scope="module")
def http(server):
    with fresh_connections(server, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def admin(server):
    with fresh_connections(server, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        yield client


def audit_records(server) -> list[dict]:
    return json_lines(server.audit_path)


def audit_of(server, request_id: str) -> list[dict]:
    return [r for r in audit_records(server) if r.get("request_id") == request_id]


def rid(name: str) -> str:
    return f"{name}-{time.time_ns()}"


# ------------------------------------------------------------------ versions

def test_api_version_is_checked_and_on_every_response(server, http):
    assert http.get("/v1/models", headers={"X-API-Version": "1"}).status_code == 200
    refused = http.post("/v1/completions", json=completion(), headers={"X-API-Version": "2"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "unsupported_api_version" and "1" in error["message"]
    responses = [refused, http.post("/v1/completions", json=completion()), http.get("/v1/nothing"),
                 httpx.get(server.base_url + "/v1/models"), httpx.get(server.base_url + "/metrics"),
                 httpx.get(server.base_url + "/health/ready"), http.get("/admin/config")]
    with http.stream("POST", "/v1/completions", json=completion(stream=True)) as streamed:
        responses.append(streamed)
    assert [r.status_code for r in responses] == [400, 200, 404, 401, 200, 200, 403, 200]
    assert all(r.headers["x-api-version"] == "1" and r.headers["x-request-id"] for r in responses)


# ---------------------------------------------------------------- audit log

def test_audit_log_has_one_record_per_request(server, http):
    plain, streamed, unauthorized = rid("audit-plain"), rid("audit-stream"), rid("audit-401")
    body = http.post("/v1/completions", json=completion(prompt=SECRET_PROMPT, max_tokens=3, user="team-7"),
                     headers={"X-Request-ID": plain}).json()
    with http.stream("POST", "/v1/completions", json=completion(max_tokens=4, stream=True, ignore_eos=True),
                     headers={"X-Request-ID": streamed}) as resp:
        assert resp.status_code == 200
        resp.read()
    assert httpx.post(server.base_url + "/v1/completions", json=completion(),
                      headers={"X-Request-ID": unauthorized, "Authorization": "Bearer nope"}).status_code == 401
    assert wait_for(lambda: all(len(audit_of(server, r)) == 1 for r in (plain, streamed, unauthorized)))

    [record] = audit_of(server, plain)
    assert record["event"] == "request" and record["status"] == 200 and record["method"] == "POST"
    assert record["path"] == "/v1/completions" and record["model"] == MODEL
    assert record["key_id"] == key_id(KEY) and record["client"] == "127.0.0.1"
    assert record["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert record["completion_tokens"] == body["usage"]["completion_tokens"] > 0
    assert record["duration_s"] > 0 and record["time"].endswith("+00:00") and record["user"] == "team-7"
    [record] = audit_of(server, streamed)  # written when the stream ended, with its tokens
    assert record["status"] == 200 and record["completion_tokens"] == 4 and record["prompt_tokens"] > 0
    [record] = audit_of(server, unauthorized)
    assert record["status"] == 401 and record["key_id"] is None and record["completion_tokens"] == 0
    text = server.audit_path.read_text()
    assert KEY not in text and "nope" not in text and SECRET_PROMPT not in text
    # Every worker appends to the same file: whole lines, records from both.
    assert {r["pid"] for r in audit_records(server)} <= server.worker_pids()


# -------------------------------------------------------- runtime settings

def test_admin_config_needs_the_admin_key_and_refuses_invalid_changes(server, http, admin):
    assert httpx.get(server.base_url + "/admin/config").status_code == 401
    forbidden = http.patch("/admin/config", json={"max_queue": 8})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    before = admin.get("/admin/config").json()
    AdminConfigResponse.model_validate(before)
    assert before["config"]["max_queue"] == 256
    assert set(before["config"]) == set(ServerConfig.runtime_fields())
    invalid = {"max_queue": 0, "log_level": "chatty", "default_max_tokens": "3", "rate_limit_per_minute": True,
               "port": 9000, "nonsense": 1}
    for field, value in invalid.items():
        # One valid change beside the invalid one: nothing at all may change.
        resp = admin.patch("/admin/config", json={"max_queue_wait_s": 5.0, field: value})
        assert resp.status_code == 400, (field, resp.text)
        assert resp.json()["error"]["param"] == field
    assert admin.patch("/admin/config", content=b"{not json").json()["error"]["code"] == "invalid_json"
    for _ in range(4):  # whichever worker answers
        assert admin.get("/admin/config").json() == before


def test_a_change_reaches_every_worker_and_the_engine(server, http, admin):
    changed = admin.patch("/admin/config", json={"default_max_tokens": 3, "log_level": "debug"})
    try:
        assert changed.status_code == 200 and changed.json()["config"]["default_max_tokens"] == 3
        # Workers' defaults: requests without max_tokens get 3 tokens, on both workers.
        served_by = {}
        for _ in range(40):
            request_id = rid("default")
            body = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "ignore_eos": True},
                             headers={"X-Request-ID": request_id}).json()
            assert body["usage"]["completion_tokens"] == 3
            assert wait_for(lambda: audit_of(server, request_id))
            served_by[audit_of(server, request_id)[0]["pid"]] = request_id
            if len(served_by) == 2:
                break
        assert set(served_by) == server.worker_pids()
        # The log level too: every worker now writes debug lines.
        debug_pids = {line["pid"] for line in json_lines(server.log_path)
                      if line["level"] == "debug" and line.get("request_id") in served_by.values()}
        assert debug_pids == set(served_by)
        # The engine: its request deadline follows request_timeout_s.
        version = admin.patch("/admin/config", json={"request_timeout_s": 1.0}).json()["version"]
        assert wait_for(lambda: any(line["role"] == "engine" and line.get("config_version") == version
                                    for line in json_lines(server.log_path)))
        assert admin.patch("/admin/config", json={"log_level": "warning"}).status_code == 200
        started = time.monotonic()
        quiet = rid("quiet")
        body = http.post("/v1/completions", json=completion(max_tokens=480, steps=480, block_length=4,
                                                            ignore_eos=True), headers={"X-Request-ID": quiet}).json()
        assert body["choices"][0]["finish_reason"] == "cancelled" and time.monotonic() - started < 30
        # At warning, not even Granian's access log writes a line for it.
        assert audit_of(server, quiet)
        time.sleep(0.5)
        assert not [line for line in json_lines(server.log_path) if line.get("request_id") == quiet]
    finally:
        restored = admin.patch("/admin/config", json={"default_max_tokens": 128, "log_level": "info",
                                                      "request_timeout_s": 600.0})
        assert restored.status_code == 200
    # Each change is audit-logged with the values before and after.
    changes = [r for r in audit_records(server) if r["event"] == "admin"]
    assert changes[-4]["before"] == {"default_max_tokens": 128, "log_level": "info"}
    assert changes[-4]["after"] == {"default_max_tokens": 3, "log_level": "debug"}
    assert [c["after"] for c in changes[-3:-1]] == [{"request_timeout_s": 1.0}, {"log_level": "warning"}]
    assert changes[-1]["after"] == {"default_max_tokens": 128, "log_level": "info", "request_timeout_s": 600.0}
    assert {change["key_id"] for change in changes} == {key_id(ADMIN)}


# ------------------------------------------------------- request-id reuse

def test_a_refused_request_does_not_consume_its_id(server, http, admin):
    request_id = rid("refused-then-served")
    headers = {"X-Request-ID": request_id}
    assert http.post("/v1/completions", json=completion(n=0), headers=headers).status_code == 400
    assert http.post("/v1/completions", json=completion(), headers={**headers, "Authorization": "Bearer x"}
                     ).status_code == 401
    assert http.post("/v1/completions", content=b"x" * (MAX_BODY + 1), headers=headers).status_code == 413
    second_key = {**headers, "Authorization": f"Bearer {KEY2}"}
    assert admin.patch("/admin/config", json={"rate_limit_per_minute": 2}).status_code == 200
    try:
        for _ in range(2):
            assert http.post("/v1/tokenize", json={"prompt": "a"}, headers={"Authorization": f"Bearer {KEY2}"}
                             ).status_code == 200
        limited = http.post("/v1/completions", json=completion(), headers=second_key)
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1
        # Per key: the first key is not limited by the second one's use.
        assert http.post("/v1/tokenize", json={"prompt": "a"}).status_code == 200
    finally:
        assert admin.patch("/admin/config", json={"rate_limit_per_minute": 0}).status_code == 200
    assert http.post("/v1/completions", json=completion(), headers=second_key).status_code == 200
    for _ in range(40):  # admitted once: refused by every worker
        reused = http.post("/v1/completions", json=completion(), headers=headers)
        assert reused.status_code == 409 and reused.json()["error"]["code"] == "duplicate_request_id"
        refused_by = {r["pid"] for r in audit_of(server, request_id) if r["status"] == 409}
        if len(refused_by) == 2:
            break
    assert refused_by == server.worker_pids()


# --------------------------------------------------------------------- drain

def test_draining_drops_readiness_and_refuses_new_generations(server, http):
    finished = {}

    def long_stream():
        body = completion(max_tokens=96, steps=96, block_length=8, ignore_eos=True, stream=True)
        with http.stream("POST", "/v1/completions", json=body) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        finished["reason"] = orjson.loads(events[-2])["choices"][0]["finish_reason"]

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    assert wait_for(lambda: "num_requests_running 1.0" in httpx.get(server.base_url + "/metrics").text)
    os.kill(server.engine_pid(), signal.SIGTERM)
    try:
        assert wait_for(lambda: httpx.get(server.base_url + "/health/ready").json().get("state") == "draining",
                        timeout=10)
        ready = httpx.get(server.base_url + "/health/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        request_id = rid("during-drain")
        refused = http.post("/v1/completions", json=completion(), headers={"X-Request-ID": request_id})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert httpx.get(server.base_url + "/health/live").status_code == 200
        assert http.get("/v1/models").status_code == 200
    finally:
        streamer.join(120)
    assert finished["reason"] == "length"  # the running request finished normally
    server.wait_ready(timeout=90)  # the supervisor starts a new engine
    assert http.post("/v1/completions", json=completion(), headers={"X-Request-ID": request_id}).status_code == 200


# ------------------------------------------------------------------- logging

def test_every_log_line_is_one_json_object(server, http):
    """Last: the log then holds a drain, an engine restart and admin changes too."""
    request_id = rid("logged")
    body = http.post("/v1/completions", json=completion(prompt=SECRET_PROMPT, max_tokens=8, ignore_eos=True),
                     headers={"X-Request-ID": request_id}).json()
    assert wait_for(lambda: any(line.get("request_id") == request_id and line["logger"] == "granian.access"
                                for line in json_lines(server.log_path)))
    lines = json_lines(server.log_path)  # raises on any line that is not JSON
    for line in lines:
        assert {"time", "level", "logger", "message", "role", "pid"} <= set(line), line
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
    assert {line["role"] for line in lines} == {"supervisor", "engine", "http", "worker"}
    access = [line for line in lines if line["logger"] == "granian.access"]
    assert len(access) > 20 and all(line.get("request_id") for line in access)
    with open(server.log_path, encoding="utf-8") as f:
        text = f.read()
    assert SECRET_PROMPT not in text and KEY not in text and ADMIN not in text
    completion_text = body["choices"][0]["text"]
    assert len(completion_text) < 4 or completion_text not in text


def test_text_format_for_humans():
    """--log-format text: Granian's lines through the same fields, one readable line each."""
    script = (
        "import logging, logging.config\n"
        "from dfastllm.config import ServerConfig\n"
        "from dfastllm.log import request_id_var\n"
        "from server.launch import logging_config\n"
        "logging.config.dictConfig(logging_config(ServerConfig(log_format='text')))\n"
        "request_id_var.set('abc-123')\n"
        "logging.getLogger('granian.access').info('%(method)s %(path)s', {'method': 'GET', 'path': '/v1/models'})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    line = result.stderr.strip()
    assert not line.startswith("{") and "INFO" in line and "[http:" in line
    assert "granian.access: GET /v1/models" in line and "request_id=abc-123" in line

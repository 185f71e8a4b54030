"""Locust load test for `dfastllm serve`: streamed and whole chat
completions. The questions are those of benchmarks/tiny_chat.py, which the
embedded default model answers with text (plain-text prompts get nothing
but EOS from it); another model answers them too. Besides locust's own
per-request rows, every streamed request reports its time to first token
("SSE ttft"), each gap between content chunks ("SSE inter-token") and its
end-to-end time ("SSE e2e"; locust's own row for a streamed request stops at
the headers) as request events of their own, so the locust statistics (and
--csv files) show their percentiles.

    locust -f benchmarks/locustfile.py --headless -u 32 -r 8 -t 150s \
        --host http://127.0.0.1:8000 --csv /tmp/dfastllm-locust

Environment: DFASTLLM_BENCH_MODEL (default: the server's first model),
DFASTLLM_BENCH_MAX_TOKENS (32: every answer of the tiny model fits; the
engine stops at EOS), DFASTLLM_BENCH_API_KEY.
"""

from __future__ import annotations

import json
import os
import time

from locust import HttpUser, between, events, task
from tiny_chat import MAX_TOKENS as ANSWER_TOKENS
from tiny_chat import chat_body

MAX_TOKENS = int(os.environ.get("DFASTLLM_BENCH_MAX_TOKENS", str(ANSWER_TOKENS)))
API_KEY = os.environ.get("DFASTLLM_BENCH_API_KEY")


def _fire(name: str, seconds: float, length: int = 0, exception=None) -> None:
    events.request.fire(request_type="SSE", name=name, response_time=seconds * 1000.0, response_length=length,
                        exception=exception, context={})


class ChatUser(HttpUser):
    wait_time = between(0.0, 0.5)
    model: str | None = os.environ.get("DFASTLLM_BENCH_MODEL")

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        if ChatUser.model is None:
            ChatUser.model = self.client.get("/v1/models").json()["data"][0]["id"]
        self.turn = 0

    def body(self, stream: bool) -> dict:
        self.turn += 1
        return chat_body(self.model, self.turn, stream=stream, max_tokens=MAX_TOKENS)

    @task(3)
    def streaming_chat(self) -> None:
        started = time.perf_counter()
        last = None
        with self.client.post("/v1/chat/completions", json=self.body(True), stream=True, catch_response=True,
                              name="/v1/chat/completions stream") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    resp.failure(event["error"]["message"])
                    return
                if any(c["delta"].get("content") for c in event["choices"]):
                    now = time.perf_counter()
                    if last is None:
                        _fire("ttft", now - started)
                    else:
                        _fire("inter-token", now - last)
                    last = now
            if last is None:
                resp.failure("no content in the stream")
                return
            resp.success()
        # Locust timed the streamed request to its headers; this is the whole answer.
        _fire("e2e", time.perf_counter() - started)

    @task(1)
    def chat(self) -> None:
        with self.client.post("/v1/chat/completions", json=self.body(False), catch_response=True,
                              name="/v1/chat/completions") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            elif not resp.json()["choices"][0]["message"]["content"]:
                resp.failure("empty answer")

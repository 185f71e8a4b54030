"""The endpoints against the app with an in-process engine: response shapes,
headers, streaming, choices, stop strings, cancellation (DELETE, client
disconnect, timeout), probes, metrics, the OpenAPI document, keys, CORS and
the body limit."""

from __future__ import annotations

import asyncio
import re

import pytest

import dfastllm
import dfastllm.tokenizer as tokenizer_module
from asgi_driver import MAX_MODEL_LEN, MODEL, parse_sse, running_app
from server import responses

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

# A generation long enough to be caught in the middle: 15 blocks of 32, one token per step.
LONG = {"model": MODEL, "prompt": "Hello", "max_tokens": 480, "steps": 480, "ignore_eos": True}


def content_text(events) -> str:
    return "".join(c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e["choices"])


async def test_models_card(api):
    resp = await api.get("/v1/models")
    cards = responses.ModelList.model_validate(resp.json())
    assert [c.id for c in cards.data] == [MODEL] and cards.data[0].max_model_len == MAX_MODEL_LEN
    resp = await api.get(f"/v1/models/{MODEL}")
    assert responses.ModelCard.model_validate(resp.json()).id == MODEL
    resp = await api.get("/v1/models/other")
    assert resp.status == 404 and resp.json()["error"]["code"] == "model_not_found"


async def test_every_response_carries_request_id_and_api_version(api):
    for method, path in (("GET", "/v1/models"), ("GET", "/nowhere"), ("POST", "/v1/models"),
                         ("GET", "/health/live"), ("POST", "/v1/completions")):
        resp = await api.request(method, path, headers={"X-Request-ID": "abc-1.2:3_x"})
        assert resp.headers["x-request-id"] == "abc-1.2:3_x"
        assert resp.headers["x-api-version"] == "1"
    resp = await api.get("/v1/models")
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])


async def test_invalid_request_id_and_api_version(api):
    resp = await api.get("/v1/models", headers={"X-Request-ID": "bad id with spaces"})
    assert resp.status == 400 and resp.json()["error"]["param"] == "X-Request-ID"
    assert resp.headers["x-request-id"] != "bad id with spaces"
    resp = await api.get("/v1/models", headers={"X-Request-ID": "x" * 129})
    assert resp.status == 400
    resp = await api.get("/v1/models", headers={"X-API-Version": "2"})
    error = resp.json()["error"]
    assert resp.status == 400 and error["code"] == "unsupported_api_version" and "1" in error["message"]
    assert (await api.get("/v1/models", headers={"X-API-Version": "1"})).status == 200


async def test_unknown_route_and_method(api):
    resp = await api.get("/v2/nothing")
    assert resp.status == 404 and responses.ErrorResponse.model_validate(resp.json())
    resp = await api.request("PUT", "/v1/completions")
    assert resp.status == 405 and "POST" in resp.headers["allow"]
    responses.ErrorResponse.model_validate(resp.json())


async def test_completion_ids_usage_and_length(api):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
    resp = await api.post("/v1/completions", json=body, headers={"X-Request-ID": "req-1"})
    completion = responses.CompletionResponse.model_validate(resp.json())
    assert completion.id == "cmpl-req-1" and completion.model == MODEL
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8
    resp = await api.post("/v1/chat/completions", headers={"X-Request-ID": "req-2"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    chat = responses.ChatCompletionResponse.model_validate(resp.json())
    assert chat.id == "chatcmpl-req-2" and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 4


async def test_streamed_completion_equals_the_collected_one(api):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 64, "ignore_eos": True}
    whole = (await api.post("/v1/completions", json=body)).json()
    resp = await api.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = resp.events()
    assert events[-1] == "[DONE]"
    chunks = [responses.CompletionChunk.model_validate(e) for e in events[:-1]]
    assert len(chunks) > 2, "the text should come in several chunks"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole["choices"][0]["text"]
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == responses.Usage(**whole["usage"])


async def test_a_worker_compiles_the_chat_template_before_its_first_request(tiny_model):
    tokenizer_module._compile_template.cache_clear()
    async with running_app(tiny_model):
        assert tokenizer_module._compile_template.cache_info().currsize == 1  # no request made yet


async def test_chat_stream_shape(api):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events = (await api.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "c1"})).events()
    assert events[-1] == "[DONE]"
    chunks = [responses.ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert all(c.id == "chatcmpl-c1" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    middle = chunks[1:-2]
    assert middle and all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in middle)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    # Without include_usage there is no usage chunk.
    body.pop("stream_options")
    events = (await api.post("/v1/chat/completions", json=body)).events()
    assert all(e == "[DONE]" or "usage" not in e for e in events)


async def test_n_choices_and_prompt_lists(api):
    body = {"model": MODEL, "prompt": ["Hello", "World"], "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 42,
            "ignore_eos": True}
    completion = (await api.post("/v1/completions", json=body)).json()
    assert sorted(c["index"] for c in completion["choices"]) == list(range(6))
    assert completion["usage"]["completion_tokens"] == 36
    assert len({c["text"] for c in completion["choices"]}) > 1, "seeds offset per choice"
    again = (await api.post("/v1/completions", json=body)).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in completion["choices"]]
    events = (await api.post("/v1/completions", json={**body, "stream": True})).events()
    texts = {}
    for event in events[:-1]:
        for c in event["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(6)] == [c["text"] for c in completion["choices"]]


async def test_stop_strings(api):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True}
    text = (await api.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    cut = text[:text.index(stop)]
    stopped = (await api.post("/v1/completions", json={**body, "stop": [stop, "\x00never"]})).json()
    assert stopped["choices"][0] == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    assert stopped["usage"]["completion_tokens"] < 48
    events = (await api.post("/v1/completions", json={**body, "stop": stop, "stream": True})).events()
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    await asyncio.sleep(0.2)
    assert not api.engine.core.has_unfinished(), "the stop string cancels the rest of the generation"


async def test_delete_cancels_a_running_request(api):
    stream = api.start("POST", "/v1/completions", json={**LONG, "stream": True}, headers={"X-Request-ID": "victim"})
    await stream.wait_for(lambda body: body.count(b"data: ") >= 2)
    resp = await api.delete("/v1/requests/victim")
    assert resp.status == 200 and responses.RequestCancelled.model_validate(resp.json()).cancelled
    events = parse_sse((await stream.finish()).body)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "cancelled"
    resp = await api.delete("/v1/requests/victim")
    assert resp.status == 404 and resp.json()["error"]["code"] == "request_not_found"
    assert (await api.delete("/v1/requests/never-seen")).status == 404
    # The id was admitted once: reusing it is refused.
    resp = await api.post("/v1/completions", json={**LONG, "max_tokens": 2, "steps": 2},
                          headers={"X-Request-ID": "victim"})
    assert resp.status == 409 and resp.json()["error"]["code"] == "duplicate_request_id"


async def test_delete_cancels_every_choice(api):
    stream = api.start("POST", "/v1/completions", json={**LONG, "n": 3, "stream": True}, headers={"X-Request-ID": "n3"})
    await stream.wait_for(lambda body: body.count(b"data: ") >= 3)
    assert (await api.delete("/v1/requests/n3")).status == 200
    events = parse_sse((await stream.finish()).body)
    reasons = {c["index"]: c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]}
    assert reasons == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
    assert not api.engine.core.has_unfinished()


async def test_the_longest_request_id_takes_several_choices(api):
    # Choice ids add "#<i>" to the request id: the wire leaves room for it.
    rid = "x" * 128
    resp = await api.post("/v1/completions", json={**LONG, "n": 2, "max_tokens": 2, "steps": 2},
                          headers={"X-Request-ID": rid})
    assert resp.status == 200, resp.body
    assert resp.headers["x-request-id"] == rid and len(resp.json()["choices"]) == 2


async def _metric(api, name: str) -> float:
    text = (await api.get("/metrics")).body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_engine_request(api, stream):
    flight = api.start("POST", "/v1/completions", json={**LONG, "stream": stream})
    if stream:
        await flight.wait_for(lambda body: body.count(b"data: ") >= 2)
    else:
        while not api.engine.core.has_unfinished():
            await asyncio.sleep(0.01)
    await flight.disconnect()
    for _ in range(100):
        if not api.engine.core.has_unfinished():
            break
        await asyncio.sleep(0.01)
    assert not api.engine.core.has_unfinished()
    assert await _metric(api, 'dfastllm:request_cancelled_total{reason="client_disconnect"}') == 1


async def test_request_timeout_cancels(tiny_model):
    async with running_app(tiny_model, request_timeout_s=0.3) as api:
        completion = (await api.post("/v1/completions", json=LONG)).json()
        assert completion["choices"][0]["finish_reason"] == "cancelled"
        assert completion["usage"]["completion_tokens"] < 480


async def test_health_probes_follow_the_engine(tiny_model):
    async with running_app(tiny_model) as api:
        assert (await api.get("/health/live")).json() == {"status": "alive"}
        for path in ("/health/ready", "/health"):
            resp = await api.get(path)
            assert resp.status == 200 and responses.Readiness.model_validate(resp.json()).state == "ready"
        await api.engine.close()  # the engine is gone: not ready, still alive
        for path in ("/health/ready", "/health"):
            resp = await api.get(path)
            assert resp.status == 503 and resp.json()["state"] == "stopped"
            assert resp.headers["retry-after"] and responses.ErrorResponse.model_validate(resp.json())
        assert (await api.get("/health/live")).status == 200
        resp = await api.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert resp.status == 503 and resp.json()["error"]["code"] == "engine_unavailable"


async def test_version(api):
    info = responses.VersionInfo.model_validate((await api.get("/version")).json())
    assert info.version == dfastllm.__version__ and info.api_versions == list(dfastllm.API_VERSIONS)


async def test_tokenize_round_trip(api, tiny_model):
    resp = await api.post("/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    tokens = responses.TokenizeResponse.model_validate(resp.json())
    assert tokens.tokens == tiny_model.tokenizer.encode("Hello world", add_special_tokens=True)
    assert tokens.max_model_len == MAX_MODEL_LEN and tokens.count == len(tokens.tokens)
    resp = await api.post("/v1/detokenize", json={"model": MODEL, "tokens": tokens.tokens})
    assert responses.DetokenizeResponse.model_validate(resp.json()).prompt == "Hello world"
    chat = await api.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    template = tiny_model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.json()["tokens"] == tiny_model.tokenizer.encode(template)
    resp = await api.post("/v1/detokenize", json={"tokens": [tiny_model.tokenizer.vocab_size]})
    assert resp.status == 400


async def test_metrics_page(api):
    await api.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True})
    await api.post("/v1/completions", json={"model": MODEL, "prompt": "", "max_tokens": 4})
    resp = await api.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.body.decode()
    for name in ("num_requests_running", "num_requests_waiting", "device_memory_used_bytes",
                 "request_success_total", "request_rejected_total", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "http_requests_total"):
        assert f"dfastllm:{name}" in text, name
    assert 'dfastllm:request_rejected_total{reason="invalid_value"} 1.0' in text
    assert 'route="/v1/completions",status="200"' in text
    assert 'le="600.0"' in text


async def test_openapi_document_covers_every_route(api):
    document = (await api.get("/openapi.json")).json()
    app = api.app.app
    routes = {route.uri_template for route in app._router._roots for route in _walk(route)}
    assert routes == set(document["paths"])
    for path, operations in document["paths"].items():
        for method in operations:
            resp = await api.request(method.upper(), path.replace("{model_id}", MODEL).replace("{request_id}", "x"))
            assert resp.status != 405, (method, path)
    schemas = document["components"]["schemas"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert "max_tokens" in schemas["CompletionRequest"]["properties"]


async def test_openapi_document_states_this_servers_keys_model_and_limits(tiny_model):
    async with running_app(tiny_model) as api:
        document = (await api.get("/openapi.json")).json()
        assert "securitySchemes" not in document["components"]
        assert not any("security" in op for ops in document["paths"].values() for op in ops.values())
        # With no admin keys the admin API is off: 403 for everyone, stated.
        assert "403" in document["paths"]["/admin/config"]["patch"]["responses"]
    async with running_app(tiny_model, api_keys=["key-a"], admin_keys=["root"], max_messages=7) as api:
        document = (await api.get("/openapi.json")).json()
        paths, schemas = document["paths"], document["components"]["schemas"]
        assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
        for method, path in (("post", "/v1/completions"), ("get", "/v1/models/{model_id}"),
                             ("patch", "/admin/config")):
            assert paths[path][method]["security"] == [{"bearer": []}] and "401" in paths[path][method]["responses"]
        assert "security" not in paths["/health/ready"]["get"] and "security" not in paths["/metrics"]["get"]
    assert schemas["CompletionRequest"]["properties"]["model"]["enum"] == [MODEL]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == 7
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == tiny_model.tokenizer.vocab_size - 1
    (request_id,) = [p for p in paths["/v1/requests/{request_id}"]["delete"]["parameters"] if p["in"] == "path"]
    assert request_id["schema"]["pattern"] == "^[A-Za-z0-9._:-]{1,128}$"
    assert "oneOf" in schemas["TokenizeRequest"]["allOf"][0]
    assert set(paths["/v1/completions"]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                    "text/event-stream"}
    assert set(paths["/openapi.json"]["get"]["responses"]["200"]["content"]) == {"application/json"}
    # No pydantic-only keyword or unreplaced limit marker leaks into the document.
    text = str(document)
    assert "'ge'" not in text and "'le'" not in text and "x-dfastllm-limit" not in text


async def test_a_method_a_route_lacks_is_405_before_the_key_check(tiny_model):
    async with running_app(tiny_model, api_keys=["key-a"]) as api:
        for method, path in (("TRACE", "/admin/config"), ("PUT", "/v1/completions"), ("POST", "/v1/models")):
            assert (await api.request(method, path)).status == 405, (method, path)
        assert (await api.get("/admin/config")).status == 403  # the admin API is off
        assert (await api.get("/v1/models")).status == 401


async def test_admin_config_patch_validates_through_its_model(tiny_model):
    admin = {"Authorization": "Bearer root"}
    async with running_app(tiny_model, admin_keys=["root"]) as api:
        before = (await api.get("/admin/config", headers=admin)).json()["config"]
        invalid = [("max_queue", 0), ("max_queue_wait_s", 0), ("log_level", "chatty"), ("default_max_tokens", "3"),
                   ("default_block_length", 1.5), ("rate_limit_per_minute", True), ("max_queue_wait_s", None),
                   ("rate_limit_per_minute", 2**63), ("port", 9000), ("nonsense", 1)]
        for field, value in invalid:
            # One valid change beside the invalid one: nothing may change.
            resp = await api.request("PATCH", "/admin/config", headers=admin, json={"max_queue": 3, field: value})
            assert resp.status == 400 and resp.json()["error"]["param"] == field, (field, resp.body)
        resp = await api.request("PATCH", "/admin/config", headers=admin, body=b'{"request_timeout_s": NaN}')
        assert resp.status == 400 and resp.json()["error"]["param"] == "request_timeout_s"
        for body in (b"{}", b"[]", b"{not json"):
            resp = await api.request("PATCH", "/admin/config", headers=admin, body=body)
            assert resp.status == 400 and resp.json()["error"]["param"] is None, body
        assert (await api.get("/admin/config", headers=admin)).json()["config"] == before
        # 64.0 is the integer 64, as JSON Schema reads it.
        resp = await api.request("PATCH", "/admin/config", headers=admin, json={"max_queue": 64.0})
        assert resp.status == 200 and resp.json()["config"] == {**before, "max_queue": 64}


def _walk(node):
    if node.resource is not None:
        yield node
    for child in node.children or ():
        yield from _walk(child)


async def test_api_keys(tiny_model):
    async with running_app(tiny_model, api_keys=["key-a", "key-b"], admin_keys=["root"]) as api:
        assert (await api.get("/v1/models")).status == 401
        resp = await api.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert resp.status == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"  # the scheme to answer with
        assert "key-a" not in resp.body.decode()
        assert (await api.get("/v1/models", headers={"Authorization": "Bearer key-b"})).status == 200
        for public in ("/health/live", "/health/ready", "/version", "/metrics", "/openapi.json"):
            assert (await api.get(public)).status == 200, public
        resp = await api.get("/admin/config", headers={"Authorization": "Bearer key-a"})
        assert resp.status == 403 and resp.json()["error"]["code"] == "forbidden"
    async with running_app(tiny_model, api_keys=["key-a"], metrics_require_key=True) as api:
        assert (await api.get("/metrics")).status == 401
        assert (await api.get("/metrics", headers={"Authorization": "Bearer key-a"})).status == 200


async def test_cors_only_for_configured_origins(tiny_model):
    async with running_app(tiny_model) as api:
        resp = await api.get("/v1/models", headers={"Origin": "https://example.com"})
        assert not any(h.startswith("access-control-") for h in resp.headers)
    async with running_app(tiny_model, cors_origins=["https://app.example"], api_keys=["k"]) as api:
        resp = await api.get("/health/live", headers={"Origin": "https://app.example"})
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        assert "X-Request-ID" in resp.headers["access-control-expose-headers"]
        resp = await api.get("/health/live", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in resp.headers
        preflight = await api.request("OPTIONS", "/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status == 200 and "POST" in preflight.headers["access-control-allow-methods"]


async def test_body_limit_declared_and_chunked(tiny_model):
    async with running_app(tiny_model, max_body_bytes=1024) as api:
        body = b'{"model": "tiny", "prompt": "' + b"a" * 4000 + b'"}'
        resp = await api.post("/v1/completions", body=body)
        assert resp.status == 413 and resp.json()["error"]["code"] == "request_too_large"
        assert resp.headers["connection"] == "close"
        flight = api.start("POST", "/v1/completions", body=body, chunked=True, chunk_size=100)
        resp = await flight.finish()
        assert resp.status == 413 and resp.json()["error"]["code"] == "request_too_large"
        assert flight.emitter.body_bytes_read <= 1024 + 100, "the app read past the limit"
        small = await api.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1},
                               chunked=True, chunk_size=7)
        assert small.status == 200


async def test_a_request_refused_after_some_choices_were_admitted_frees_its_id(tiny_model):
    async with running_app(tiny_model, max_batch_size=1, max_queue=1) as api:
        running = api.start("POST", "/v1/completions", json={**LONG, "stream": True}, headers={"X-Request-ID": "busy"})
        await running.wait_for(lambda body: body.count(b"data: ") >= 1)
        # Choice 0 takes the one queue place, choice 1 is refused: the whole request is.
        resp = await api.post("/v1/completions", json={**LONG, "n": 2}, headers={"X-Request-ID": "pair"})
        assert resp.status == 503 and resp.json()["error"]["code"] == "overloaded"
        assert (await api.delete("/v1/requests/busy")).status == 200
        await running.finish()
        # (n=1: with one queue place, two choices sent at once can again be refused.)
        resp = await api.post("/v1/completions", json={**LONG, "max_tokens": 1, "steps": 1},
                              headers={"X-Request-ID": "pair"})
        assert resp.status == 200, resp.body
        assert not api.engine.core.has_unfinished()


async def test_full_queue_is_503_overloaded_with_retry_after(tiny_model):
    async with running_app(tiny_model, max_batch_size=1, max_queue=1) as api:
        running = api.start("POST", "/v1/completions", json={**LONG, "stream": True}, headers={"X-Request-ID": "r1"})
        await running.wait_for(lambda body: body.count(b"data: ") >= 1)
        waiting = api.start("POST", "/v1/completions", json={**LONG, "stream": True}, headers={"X-Request-ID": "r2"})
        while api.engine.core.num_waiting < 1:
            await asyncio.sleep(0.01)
        resp = await api.post("/v1/completions", json=LONG, headers={"X-Request-ID": "r3"})
        assert resp.status == 503 and resp.json()["error"]["code"] == "overloaded"
        assert int(resp.headers["retry-after"]) >= 1
        for rid, flight in (("r1", running), ("r2", waiting)):
            assert (await api.delete(f"/v1/requests/{rid}")).status == 200
            assert parse_sse((await flight.finish()).body)[-1] == "[DONE]"
        # A refused request did not consume its id.
        resp = await api.post("/v1/completions", json={**LONG, "max_tokens": 1, "steps": 1},
                              headers={"X-Request-ID": "r3"})
        assert resp.status == 200

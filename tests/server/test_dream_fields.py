"""Dream's request fields over HTTP: `alg`, `alg_temp`, `eps` and `top_k`
reach the engine for a Dream model (block_length omitted: Dream's own
decoding), are refused where they do not apply or out of range, and are
documented in /openapi.json."""

from __future__ import annotations

import pytest

from asgi_driver import MAX_MODEL_LEN, MODEL, running_app
from dfastllm import SamplingParams
from dfastllm.llm import LLM
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_dream
from server.responses import ErrorResponse

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def tiny_dream(tmp_path_factory):
    return load_model(write_tiny_dream(tmp_path_factory.mktemp("tiny-dream"), seed=6,
                                       max_position_embeddings=MAX_MODEL_LEN))


@pytest.fixture
async def dream_api(tiny_dream):
    async with running_app(tiny_dream) as app:
        yield app


def body(**fields):
    return {"model": MODEL, "prompt": "Hello there", "max_tokens": 8, **fields}


async def test_a_dream_request_decodes_as_the_offline_api_does(dream_api, tiny_dream):
    fields = dict(steps=3, alg="topk_margin", eps=0.01, top_k=50, ignore_eos=True)
    resp = await dream_api.post("/v1/completions", json=body(**fields))
    assert resp.status == 200, resp.body
    prompt_ids = tiny_dream.tokenizer.encode("Hello there", add_special_tokens=True)
    expected = LLM(tiny_dream).generate([prompt_ids], SamplingParams(max_tokens=8, **fields))[0]
    assert resp.json()["choices"][0]["text"] == tiny_dream.tokenizer.decode(expected.token_ids)
    assert expected.num_steps == 3  # whole canvas: 3 steps, not 3 per block


@pytest.mark.parametrize("fields", [dict(alg="origin", temperature=0.8, seed=3), dict(alg="entropy", alg_temp=0.3),
                                    dict(alg="maskgit_plus", threshold=0.5), dict(top_k=-1), dict(top_k=0),
                                    dict(block_length=4, remasking="random")])
async def test_accepted_on_dream(dream_api, fields):
    resp = await dream_api.post("/v1/completions", json=body(**fields))
    assert resp.status == 200, resp.body


DREAM_REFUSED = [
    (dict(remasking="random"), "remasking"),  # LLaDA's rule, without block_length
    (dict(block_length=4, alg="entropy"), "alg"),  # block-wise decoding is LLaDA's
    (dict(alg="entropy", threshold=0.9), "alg"),  # the threshold rule ranks by probability
    (dict(alg="origin", alg_temp=0.5), "alg_temp"),
    (dict(alg="beam"), "alg"),
    (dict(alg_temp=-0.1), "alg_temp"),
    (dict(eps=0.0), "eps"),
    (dict(eps=1.0), "eps"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
]


@pytest.mark.parametrize("fields,param", DREAM_REFUSED)
async def test_refused_on_dream_naming_the_field(dream_api, fields, param):
    resp = await dream_api.post("/v1/completions", json=body(**fields))
    assert resp.status == 400, resp.body
    error = ErrorResponse.model_validate(resp.json()).error
    assert (error.code, error.param) == ("invalid_value", param)
    assert len(dream_api.engine.router.recent_ids) == 0, "an invalid request reached the engine"


@pytest.mark.parametrize("fields,param", [(dict(alg="entropy"), "alg"), (dict(alg_temp=0.2), "alg_temp"),
                                          (dict(eps=0.01), "eps")])
async def test_dream_fields_refused_on_llada(api, fields, param):
    resp = await api.post("/v1/completions", json=body(**fields))
    assert resp.status == 400, resp.body
    error = ErrorResponse.model_validate(resp.json()).error
    assert error.param == param and "Dream" in error.message


async def test_openapi_documents_the_fields(api):
    schemas = (await api.get("/openapi.json")).json()["components"]["schemas"]
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schemas[request]["properties"]
        for name in ("alg", "alg_temp", "eps", "top_k"):
            assert name in properties, (request, name)
        assert "Dream" in str(properties["alg"])

"""The offline API: prompt forms, per-prompt parameters, chat templates, and
the embedded default model."""

import os

import pytest

from dfastllm import LLM, SamplingParams
from dfastllm.checkpoints import DEFAULT_MODEL_DIR

from .conftest import generate, prompt

PARAMS = SamplingParams(max_tokens=8, block_length=4, steps=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llada):
    return LLM(llada)


@pytest.mark.timeout(60)
def test_prompt_forms(llm, llada):
    text = "Hello, world!"
    ids = llada.tokenizer.encode(text, add_special_tokens=True)
    one, = llm.generate(text, PARAMS)
    assert (one.prompt, one.prompt_token_ids) == (text, ids)
    assert len(one.token_ids) == 8 and one.finish_reason == "length" and one.num_steps == 4
    assert one.text == llada.tokenizer.decode(one.token_ids)
    # The same prompt as a list of strings, as token ids, and as a flat id list.
    assert llm.generate([text], PARAMS)[0].token_ids == one.token_ids
    from_ids, = llm.generate([ids], PARAMS)
    assert from_ids.prompt is None and from_ids.token_ids == one.token_ids
    assert llm.generate(ids, PARAMS)[0].token_ids == one.token_ids
    # Equal to the engine driven directly.
    assert generate(llada, [("x", ids, PARAMS)])["x"][0] == one.token_ids


@pytest.mark.timeout(60)
def test_one_params_per_prompt_and_order(llm):
    params = [PARAMS, SamplingParams(max_tokens=12, block_length=4, steps=6, ignore_eos=True)]
    outs = llm.generate([prompt(3), prompt(9, start=100)], params)
    assert [len(o.token_ids) for o in outs] == [8, 12]
    assert outs[1].prompt_token_ids == prompt(9, start=100)
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate([prompt(3)] * 3, params)


@pytest.mark.timeout(60)
def test_chat_applies_the_template(llm, llada):
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    one, = llm.chat(conversation, PARAMS)
    expected_ids = llada.tokenizer.encode(llada.tokenizer.apply_chat_template(conversation))
    assert one.prompt_token_ids == expected_ids
    assert one.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    two = llm.chat([conversation, [{"role": "user", "content": "Hi"}]], PARAMS)
    assert len(two) == 2 and two[0].token_ids == one.token_ids


def test_bad_input_leaves_nothing_behind(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([prompt(3), []], PARAMS)
    assert not llm.engine.has_unfinished()


def test_default_model_is_the_embedded_one():
    assert os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json"))
    out, = LLM(device="cpu").chat([[{"role": "user", "content": "Reverse: cheap"}]],
                                  SamplingParams(max_tokens=32, temperature=0.0))
    assert (out.text, out.finish_reason) == ("paehc", "stop")

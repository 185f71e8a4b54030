"""kv_cache="none" at temperature 0 reproduces the LLaDA reference generation
(MODEL_FORMATS.md, "Reference generation") token for token.

The reference here is its own loop, written from that description: a full
forward of the whole canvas every step, argmax, softmax confidence, -inf
outside the current block and on committed positions, per-sequence topk,
`get_num_transfer_tokens`. It shares nothing with the engine but the model's
forward and head. The engine stops at the first EOS / end of turn, so the
reference's final canvas is compared truncated there.

One rule is added to the public reference, as the engine has it: the mask
token is never proposed. A trained model gives it ~0 probability, so this is
the reference's behaviour on real checkpoints; on random tiny ones the public
code can "commit" a mask, which leaves the cell masked and stalls the block.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dfastllm import SamplingParams
from dfastllm.llm import LLM

from .conftest import prompt


def get_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64, device=mask_num.device) + base
    for i in range(mask_num.size(0)):
        num[i, :remainder[i]] += 1
    return num


@torch.inference_mode()
def reference_generate(loaded, prompt_ids, gen_length, block_length, steps) -> list[int]:
    model, mask_id = loaded.model, loaded.mask_token_id
    device = next(model.parameters()).device
    x = torch.full((1, len(prompt_ids) + gen_length), mask_id, dtype=torch.long, device=device)
    x[0, :len(prompt_ids)] = torch.tensor(prompt_ids)
    p_len = len(prompt_ids)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    positions = torch.arange(x.shape[1], device=device)[None]
    for nb in range(num_blocks):
        block_start, block_end = p_len + nb * block_length, p_len + (nb + 1) * block_length
        num_transfer = get_num_transfer_tokens(x[:, block_start:block_end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model.head(model(x, positions))  # [1, L, V]
            if model.logits_shift:  # Dream: position i is predicted from hidden i - 1
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            logits[..., mask_id] = -torch.inf
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.float(), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, block_end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x[0, p_len:].tolist()


def truncate_at_stop(tokens, stop_ids):
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i], "stop"
    return tokens, "length"


# The last two leave remainders (6 tokens over 4 steps, 10 over 3): the schedule front-loads them.
CASES = [(16, 8, 8), (16, 4, 8), (24, 8, 12), (32, 32, 32), (16, 16, 4), (18, 6, 12), (20, 10, 6)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_engine_matches_reference(family, llada, dream):
    assert_engine_matches_reference({"llada": llada, "dream": dream}[family])


def assert_engine_matches_reference(loaded):
    """On `loaded`'s device (tests/engine/test_cuda.py runs it on a GPU)."""
    llm = LLM(loaded, kv_cache="none")
    stop_ids = {loaded.eos_token_id, loaded.eot_token_id} - {None}
    prompts = [prompt(5), prompt(9, start=90), prompt(3, start=150)]
    for gen_length, block_length, steps in CASES:
        params = SamplingParams(max_tokens=gen_length, block_length=block_length, steps=steps)
        outputs = llm.generate(prompts, params)  # batched together, as a user would
        for ids, out in zip(prompts, outputs):
            ref = reference_generate(loaded, ids, gen_length, block_length, steps)
            assert loaded.mask_token_id not in ref
            expected, reason = truncate_at_stop(ref, stop_ids)
            assert out.token_ids == expected, (gen_length, block_length, steps, ids)
            assert out.finish_reason == reason
        # Early stop: a token of the second half ends the generation at its
        # first occurrence, often before the last block ran.
        stop = ref[gen_length // 2]
        early = llm.generate(prompts[-1], dataclasses.replace(params, stop_token_ids=(stop,)))[0]
        expected, reason = truncate_at_stop(ref, stop_ids | {stop})
        assert (early.token_ids, early.finish_reason) == (expected, "stop")

"""Train the embedded tiny LLaDA-format diffusion model (dfastllm/assets/tiny-llada).

    python tools/train_tiny.py --out dfastllm/assets/tiny-llada [--state /tmp/tiny-llada.state]

CPU only, reproducible from --seed (torch.manual_seed and a seeded task
stream); with --state a killed run resumes exactly where its last eval left it.
The model is `dfastllm.models.llada.LLaDAModel` itself, so the checkpoint is an
ordinary LLaDA checkpoint (config.json fields and tensor names of LLaDA-8B)
that the one loader serves. The tokenizer is byte-level (token id = byte
value) plus "\\n\\n", the role names and LLaDA's special tokens, with LLaDA's
chat template. The defaults are the recipe of the shipped checkpoint (its
model card, dfastllm/assets/tiny-llada/README.md, has the figures).

Objective: LLaDA's SFT recipe. Per sequence a masking ratio t ~ U(eps, 1];
every token of the answer region (answer, <|eot_id|>, then <|endoftext|>
padding) is masked with probability t, the prompt never; cross-entropy on the
masked positions weighted by 1/t and divided by the answer-region length.

Why a curriculum: a tiny masked-diffusion model that reads characters has to
learn to find things in its prompt (copy the j-th letter, find the letter
after a given one) before any family works, and with answer-only masking on
the full mixture that took ~3000 steps to even begin here. So the first
--warmup-mix-steps draw mostly copy/reverse questions, and some rows use
LLaDA's pre-training masking (prompt tokens masked too); the pre-training rows
halve after the curriculum and stop when the lr decays, so the model ends on
the plain SFT objective.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time

# Before torch loads OpenMP: on a shared, oversubscribed machine spinning
# worker threads burn their time slices waiting for a descheduled peer
# (measured here: 11 s/step spinning vs 2 s/step passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer as BackendTokenizer, decoders, models, pre_tokenizers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_tasks  # noqa: E402
from dfastllm.models import load_model  # noqa: E402
from dfastllm.models.llada import LLaDAConfig, LLaDAModel, checkpoint_names  # noqa: E402
from dfastllm.tokenizer import Tokenizer  # noqa: E402

BOS, EOS, EOT, MASK = "<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT, MASK]
# LLaDA-8B-Instruct's template (Llama-3 headers, bos_token = <|startoftext|>).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are tiny-llada.", "Answer briefly."]
ANSWER_REGION = 32      # generation length the model is tuned for (= the engine's block length)
MAX_ANSWER_REGION = 64  # longer regions are trained too, so max_tokens up to 64 behaves


def _byte_to_char() -> dict[int, str]:
    # GPT-2's printable stand-ins for bytes, the alphabet of tokenizers' ByteLevel.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


# The chat header's role names as single tokens: every example carries them,
# and at one token per letter they cost ~15% of each training step.
ROLE_TOKENS = ["system", "user", "assistant"]


def build_tokenizer() -> BackendTokenizer:
    """Byte-level (the first 256 ids are the bytes: one token per letter and
    per digit, as in Llama-2), plus "\\n\\n", the chat roles and LLaDA's
    special tokens. Reversing or counting letters is reversing or counting
    tokens, and sums are worked digit by digit; any UTF-8 text encodes."""
    byte_chars = _byte_to_char()
    vocab = {char: byte for byte, char in byte_chars.items()}
    newline = byte_chars[ord("\n")]
    vocab[newline * 2] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[(newline, newline)]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return backend


def write_tokenizer(backend: BackendTokenizer, out_dir: str) -> None:
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    added = {
        str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": t in SPECIAL_TOKENS}
        for t in ROLE_TOKENS + SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def llada_config(tokenizer: Tokenizer, args) -> dict:
    """config.json with LLaDA-8B's field names; small sizes."""
    return {
        "model_type": "llada", "architectures": ["LLaDAModelLM"],
        "d_model": args.d_model, "n_layers": args.n_layers,
        "n_heads": args.n_heads, "n_kv_heads": args.n_heads,
        "mlp_hidden_size": args.mlp_hidden_size, "mlp_ratio": args.mlp_hidden_size // args.d_model,
        "vocab_size": tokenizer.vocab_size,
        "embedding_size": -(-tokenizer.vocab_size // 8) * 8,  # padded rows, as LLaDA pads
        "max_sequence_length": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "weight_tying": False, "block_type": "llama", "activation_type": "silu",
        "layer_norm_type": "rms", "include_bias": False, "include_qkv_bias": False,
        "rope": True, "rope_full_precision": True, "scale_logits": False,
        "attention_layer_norm": False, "input_emb_norm": False,
        "torch_dtype": "bfloat16",
    }


def init_weights(model: LLaDAModel, digit_ids: list[int]) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2L).
    The digit embeddings also get a number line and a period-10 circle along
    fixed directions: a head that averages two digits' embeddings then holds
    their sum (and a running count plus one is a shift along the line), so
    the worked sums and tallies need no digit-pair table learned from scratch."""
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            std = residual_std if name.endswith(("attn.wo.weight", "mlp.w_down.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    with torch.no_grad():
        embedding = model.embed.weight
        line, cos, sin = torch.linalg.qr(torch.randn(embedding.shape[1], 3))[0].T
        for digit, token in enumerate(digit_ids):
            angle = 2 * math.pi * digit / 10
            embedding[token] += 0.3 * ((digit - 4.5) / 4.5 * line + math.cos(angle) * cos + math.sin(angle) * sin)


def prompt_ids(tokenizer: Tokenizer, task: tiny_tasks.Task, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": task.prompt}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


class Batches:
    """Deterministic training batches: tasks from the seeded stream, encoded as
    prompt + answer region, grouped by length so the EOS padding to the longest
    row (LLaDA pads with EOS and counts it as answer) stays small. The first
    `warmup_mix_steps` batches draw from the curriculum mixture."""

    def __init__(self, tokenizer: Tokenizer, seed: int, batch_size: int, warmup_mix_steps: int = 0,
                 group: int = 16):
        self.tokenizer, self.batch_size, self.group = tokenizer, batch_size, group
        self.warmup_mix_steps = warmup_mix_steps
        self.rng = random.Random(seed + 1)
        self.task_rng = random.Random(seed)

    def _example(self, task: tiny_tasks.Task) -> tuple[list[int], list[int]]:
        system = self.rng.choice(SYSTEM_PROMPTS) if self.rng.random() < 0.05 else None
        prompt = prompt_ids(self.tokenizer, task, system)
        answer = self.tokenizer.encode(task.answer) + [self.tokenizer.eot_token_id]
        # Answer regions: the full 32 the engine decodes by default, sometimes up
        # to 64, and mostly just a few EOS past the answer, which teaches the
        # same stop at a third of the compute.
        draw = self.rng.random()
        if draw < 0.3:
            region = ANSWER_REGION
        elif draw < 0.4:
            region = self.rng.randint(len(answer), MAX_ANSWER_REGION)
        else:
            region = len(answer) + self.rng.randint(0, 4)
        return prompt, answer + [self.tokenizer.eos_token_id] * (region - len(answer))

    def __iter__(self):
        for first_step in itertools.count(0, self.group):
            mix = tiny_tasks.WARMUP_MIX if first_step < self.warmup_mix_steps else tiny_tasks.TRAIN_MIX
            examples = [self._example(tiny_tasks.sample_training_task(self.task_rng, mix))
                        for _ in range(self.batch_size * self.group)]
            examples.sort(key=lambda e: len(e[0]) + len(e[1]))
            chunks = [examples[i:i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
            self.rng.shuffle(chunks)
            yield from (self._collate(chunk) for chunk in chunks)

    def _collate(self, examples):
        length = max(len(p) + len(a) for p, a in examples)
        eos = self.tokenizer.eos_token_id
        ids = torch.tensor([p + a + [eos] * (length - len(p) - len(a)) for p, a in examples])
        prompt_len = torch.tensor([len(p) for p, _ in examples])
        is_answer = torch.arange(length)[None, :] >= prompt_len[:, None]  # [B, T]
        return ids, is_answer


def masked_diffusion_loss(model: LLaDAModel, ids, is_answer, mask_id: int, pretrain_fraction: float = 0.0,
                          eps: float = 1e-3):
    """LLaDA's SFT loss: answer tokens masked with probability t, CE / t,
    divided by the answer-region length. A random `pretrain_fraction` of the
    rows use LLaDA's pre-training masking instead (every token, prompt
    included, may be masked; divided by the whole length): reconstructing the
    question from the answer trains the same look-up circuits from the other
    side, which roughly halves the steps before they appear."""
    B, T = ids.shape
    # Stratified draws of t (one per stratum of [0, 1)): each t is still
    # U(eps, 1] but the batch covers the range evenly, which lowers variance.
    u = (torch.rand(()) + torch.arange(B) / B) % 1.0
    t = eps + (1 - eps) * u                                                    # [B]
    pretrain_rows = torch.rand(B) < pretrain_fraction                          # [B]
    maskable = is_answer | pretrain_rows[:, None]                              # [B, T]
    masked = (torch.rand(B, T) < t[:, None]) & maskable                        # [B, T]
    noisy = torch.where(masked, mask_id, ids)
    positions = torch.arange(T).expand(B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(noisy, positions)                                       # [B, T, D]
        logits = model.head(hidden[masked])                                    # [N, V]
    token_loss = F.cross_entropy(logits.float(), ids[masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    maskable_len = maskable.sum(1)                                             # [B]
    return (token_loss / t[rows] / maskable_len[rows]).sum() / B


@torch.no_grad()
def generate(model: LLaDAModel, prompts: list[list[int]], mask_id: int, gen_length: int = ANSWER_REGION,
             block_length: int = ANSWER_REGION, steps: int = ANSWER_REGION) -> list[list[int]]:
    """LLaDA's reference `generate` at temperature 0 with low_confidence
    remasking, batched with left padding (masked out of attention)."""
    B, P = len(prompts), max(map(len, prompts))
    T = P + gen_length
    canvas = torch.full((B, T), mask_id, dtype=torch.long)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        canvas[b, :P - len(p)] = 0
        valid[b, :P - len(p)] = False
        canvas[b, P - len(p):P] = torch.tensor(p)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    attn_mask = valid[:, None, None, :].expand(B, 1, T, T)
    blocks = gen_length // block_length
    steps_per_block = steps // blocks
    for block in range(blocks):
        lo, hi = P + block * block_length, P + (block + 1) * block_length
        n = block_length  # every position of the block starts masked
        schedule = [n // steps_per_block + (1 if s < n % steps_per_block else 0) for s in range(steps_per_block)]
        for k in schedule:
            logits = model.head(model(canvas, positions, attn_mask)[:, lo:hi]).float()   # [B, L, V]
            probs = logits.softmax(-1)
            x0 = logits.argmax(-1)                                                       # [B, L]
            confidence = probs.gather(-1, x0[..., None])[..., 0]
            still_masked = canvas[:, lo:hi] == mask_id
            confidence = torch.where(still_masked, confidence, -math.inf)
            chosen = confidence.topk(k, dim=-1).indices                                  # [B, k]
            block_view = canvas[:, lo:hi]
            block_view.scatter_(1, chosen, x0.gather(1, chosen))
    return canvas[:, P:].tolist()


def answer_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The reply up to the first end-of-turn / end-of-text token."""
    stops = {tokenizer.eot_token_id, tokenizer.eos_token_id}
    end = next((i for i, tok in enumerate(ids) if tok in stops), len(ids))
    return tokenizer.decode(ids[:end])


def evaluate(model: LLaDAModel, tokenizer: Tokenizer, tasks: list[tiny_tasks.Task], batch_size: int = 64,
             bf16: bool = True):
    """Per-family accuracy on held-out tasks, reference decoding."""
    correct: dict[str, list[bool]] = {}
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i:i + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = generate(model, [prompt_ids(tokenizer, t) for t in chunk], tokenizer.mask_token_id)
        for task, out in zip(chunk, outputs):
            correct.setdefault(task.family, []).append(tiny_tasks.check(task, answer_text(tokenizer, out)))
    accuracy = {family: sum(c) / len(c) for family, c in correct.items()}
    accuracy["overall"] = sum(map(sum, correct.values())) / sum(map(len, correct.values()))
    return accuracy


def save_checkpoint(model: LLaDAModel, config: dict, out_dir: str) -> None:
    ours = model.checkpoint_parameters()  # the fused q|k|v and gate|up split back into parts
    tensors = {ckpt: ours[name].to(torch.bfloat16).contiguous() for ckpt, name in checkpoint_names(model.config).items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def decay_start(args) -> int:
    """The first step of the learning-rate decay."""
    return int(args.steps * (1 - args.decay_fraction))


def learning_rate(step: int, args) -> float:
    """Warm-up, a long constant stretch, then a linear decay over the last
    `decay_fraction` of the steps. Unlike cosine, every run with more steps
    follows the same path until its decay starts, so a run can be extended
    by resuming from a state saved before that point."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    start = decay_start(args)
    if step < start:
        return args.lr
    return args.lr * (1 - 0.95 * (step - start) / max(1, args.steps - start))


def pretrain_fraction(step: int, args) -> float:
    """LLaDA pre-trains, then fine-tunes: rows with whole-sequence masking make
    up `pretrain_fraction` of the batches during the curriculum, half that
    until the lr decays, and none in the decay (pure SFT at the end)."""
    if step < args.warmup_mix_steps:
        return args.pretrain_fraction
    return args.pretrain_fraction / 2 if step < decay_start(args) else 0.0


def save_state(path: str, step: int, model, optimizer) -> None:
    """Everything needed to continue exactly: weights, optimizer, RNG; the task
    stream is replayed to `step` (it is deterministic)."""
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dfastllm/assets/tiny-llada")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--decay-fraction", type=float, default=0.5, help="share of the steps with a decaying lr")
    p.add_argument("--warmup-mix-steps", type=int, default=1500,
                   help="steps drawn from the copy-heavy curriculum mixture")
    p.add_argument("--pretrain-fraction", type=float, default=0.5,
                   help="share of rows with whole-sequence masking during the curriculum")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp-hidden-size", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-per-family", type=int, default=30, help="held-out questions per family during training")
    p.add_argument("--final-eval-per-family", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--state", help="training-state file: written at each eval, resumed from when it exists")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    write_tokenizer(build_tokenizer(), args.out)
    tokenizer = Tokenizer.from_pretrained(args.out)
    config = llada_config(tokenizer, args)
    model = LLaDAModel(LLaDAConfig.from_hf_config(config))
    init_weights(model, [tokenizer.encode(str(d))[0] for d in range(10)])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, vocab {tokenizer.vocab_size}, args {vars(args)}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    eval_tasks = tiny_tasks.held_out_set(args.eval_per_family)
    first_step = 0
    if args.state and os.path.exists(args.state):
        state = torch.load(args.state)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        first_step = state["step"]
        print(f"resumed from {args.state} at step {first_step}", flush=True)
    start, losses = time.time(), []
    batches = Batches(tokenizer, args.seed, args.batch_size, args.warmup_mix_steps)
    for step, (ids, is_answer) in enumerate(batches):
        if step == args.steps:
            break
        if step < first_step:  # replaying the task stream up to the saved state
            continue
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = masked_diffusion_loss(model, ids, is_answer, tokenizer.mask_token_id, pretrain_fraction(step, args))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {sum(losses) / len(losses):.4f} lr {learning_rate(step, args):.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
            losses = []
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            accuracy = evaluate(model, tokenizer, eval_tasks)
            save_checkpoint(model, config, args.out)  # a usable checkpoint if the run is cut short
            if args.state:
                save_state(args.state, step + 1, model, optimizer)
            print(f"eval step {step + 1}: " + json.dumps({k: round(v, 3) for k, v in accuracy.items()}), flush=True)
    train_seconds = time.time() - start
    save_checkpoint(model, config, args.out)
    # Final figures from the saved weights through the serving loader (fp32 on CPU).
    served = load_model(args.out)
    accuracy = evaluate(served.model, served.tokenizer, tiny_tasks.held_out_set(args.final_eval_per_family),
                        bf16=False)
    print(f"trained steps {first_step}..{args.steps} in {train_seconds:.0f}s; params {n_params}", flush=True)
    print("final " + json.dumps({k: round(v, 4) for k, v in accuracy.items()}), flush=True)


if __name__ == "__main__":
    main()

"""The tiny model's task generator, tokenizer and shipped checkpoint."""

import itertools
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import tiny_tasks  # noqa: E402

ASSET = os.path.join(REPO, "dfastllm", "assets", "tiny-llada")


def arithmetic_operands(prompt: str) -> tuple[int, str, int]:
    if m := re.search(r"Subtract (\d+) from (\d+)", prompt):
        return int(m[2]), "-", int(m[1])
    a, op, b = re.search(r"(\d+)\D*?(\+|-|plus|minus|and)\s*(\d+)", prompt).groups()
    return int(a), "+" if op in ("+", "plus", "and") else "-", int(b)


def count_question(prompt: str) -> tuple[str, str]:
    return re.search(r"(?:letter |many )([a-z])(?:'s)? .*in ([a-z]+)", prompt).groups()


def solve(task: tiny_tasks.Task) -> str:
    """The answer (for the worked families, its final number) worked out from
    the prompt text alone, independently of the generator."""
    p = task.prompt
    if task.family == "arithmetic":
        a, op, b = arithmetic_operands(p)
        return str(a + b if op == "+" else a - b)
    if task.family == "sort":
        return ", ".join(map(str, sorted(int(x) for x in re.findall(r"\d+", p))))
    if task.family == "reverse":
        return re.search(r"(?:word |Spell |: )([a-z]+)", p)[1][::-1]
    if task.family == "count":
        letter, word = count_question(p)
        return str(word.count(letter))
    if task.family == "copy":
        return p.split(": ", 1)[1]
    if task.family == "facts":
        key = re.search(r"(?:capital|opposite) of (.+?)(?: is)?[?.]?$", p, re.IGNORECASE)[1]
        return (tiny_tasks.CAPITALS if "capital" in p.lower() else tiny_tasks.OPPOSITES)[key]
    return tiny_tasks.CHAT_ANSWERS[p]


def subject(task: tiny_tasks.Task):
    """What a question is about, whatever its template (facts: the template)."""
    if task.family == "arithmetic":
        return arithmetic_operands(task.prompt)
    if task.family == "sort":
        return tuple(re.findall(r"\d+", task.prompt))
    if task.family == "reverse":
        return solve(task)
    if task.family == "count":
        return count_question(task.prompt)
    if task.family == "copy":
        return solve(task)
    return re.sub(r"(capital|opposite) of .*", r"\1 of X", task.prompt, flags=re.IGNORECASE)


def final_answer(task: tiny_tasks.Task) -> str:
    """The answer's final part; arithmetic and counting answers show their
    work and end "so N", and the work is checked step by step on the way."""
    if task.family in ("arithmetic", "count"):
        work, final = task.answer.rsplit(", so ", 1)
        check_work(task, work)
        return final
    return task.answer


def check_work(task: tiny_tasks.Task, work: str) -> None:
    """The worked steps are each right: column sums/differences units first
    (with the carry or borrow), or the asked letter, then the word letter by
    letter with its mark (+ for the asked letter) and a running count of it."""
    if task.family == "arithmetic":
        a, op, b = arithmetic_operands(task.prompt)
        units, tens = work.split(", ")
        if op == "+":
            carry = a % 10 + b % 10 >= 10
            assert units == f"{a % 10}+{b % 10}={a % 10 + b % 10}", task
            assert tens == f"{a // 10}+{b // 10}{'+1' if carry else ''}={a // 10 + b // 10 + carry}", task
        else:
            borrow = a % 10 < b % 10
            assert units == f"{a % 10 + 10 * borrow}-{b % 10}={(a - b) % 10}", task
            assert tens == f"{a // 10}{'-1' if borrow else ''}-{b // 10}={(a - b) // 10}", task
        return
    letter, word = count_question(task.prompt)
    asked, tally = work.split(": ", 1)
    assert asked == letter, task
    steps = [tally[i:i + 3] for i in range(0, len(tally), 3)]
    assert "".join(step[0] for step in steps) == word, task
    assert [step[1] for step in steps] == ["+" if char == letter else "-" for char in word], task
    assert [int(step[2]) for step in steps] == [word[:i + 1].count(letter) for i in range(len(word))], task


def training_window(n=30_000, seed=0):
    return list(itertools.islice(tiny_tasks.training_stream(seed), n))


def test_every_family_appears_with_checkable_answers():
    tasks = training_window(5_000)
    assert {t.family for t in tasks} == set(tiny_tasks.TRAIN_MIX)
    for task in tasks:
        assert solve(task) == final_answer(task), task
        assert 0 < len(task.answer) <= 31, task  # answer + <|eot_id|> fit the 32-token region


def test_count_answers_are_balanced():
    """A model that always says "1" must not pass: every count 0..3 is common."""
    counts = [solve(t) for t in training_window(5_000) if t.family == "count"]
    for n in "0123":
        assert counts.count(n) >= len(counts) * 0.15, n


def test_held_out_answers_are_right_too():
    held = tiny_tasks.held_out_set(50)
    assert {t.family for t in held} == set(tiny_tasks.SCORED_FAMILIES)
    for task in held:
        assert solve(task) == final_answer(task), task


def test_checker_accepts_right_and_rejects_wrong_answers():
    for task in tiny_tasks.held_out_set(20):
        assert tiny_tasks.check(task, task.answer)
        assert tiny_tasks.check(task, f"  {task.answer}.\n")
        assert not tiny_tasks.check(task, "")
        assert not tiny_tasks.check(task, task.answer + "1")
        assert not tiny_tasks.check(task, task.answer[:-1])
        assert not tiny_tasks.check(task, f"The answer is {task.answer}")


def test_held_out_questions_never_appear_in_training():
    held = tiny_tasks.held_out_set(100)
    train = training_window()
    assert not {t.prompt for t in held} & {t.prompt for t in train}
    # Beyond the exact prompt: no held-out operand triple, list, word,
    # (word, letter) pair or phrase is trained under another template, and no
    # held-out fact phrasing is trained.
    for family in tiny_tasks.SCORED_FAMILIES:
        held_subjects = {subject(t) for t in held if t.family == family}
        train_subjects = {subject(t) for t in train if t.family == family}
        assert held_subjects and not held_subjects & train_subjects, family


def test_training_stream_is_deterministic():
    assert training_window(500, seed=3) == training_window(500, seed=3)
    assert training_window(500, seed=3) != training_window(500, seed=4)


def test_tokenizer_is_byte_level_with_llada_chat_format(tmp_path):
    from dfastllm.tokenizer import Tokenizer
    import train_tiny

    train_tiny.write_tokenizer(train_tiny.build_tokenizer(), tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    # Letters (and any other text) are one token per byte: reversing or
    # counting letters is reversing or counting tokens.
    text = "Reverse the word été, please!"
    assert tok.encode(text) == list(text.encode())
    text = "12 + 7 = 19"  # digits too: sums are worked digit by digit
    assert tok.encode(text) == list(text.encode())
    for text in ("What is 99 - 100?", "tabs\tand\n\nnewlines 0 00 000 0000", "user assistant system"):
        assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": " What is 2 + 3? "}])
    assert prompt == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
                      "What is 2 + 3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # The header is five tokens: BOS, two specials around the role, "\n\n".
    header = tok.encode("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n")
    assert header == tok.encode(prompt)[:5] and header[0] == tok.bos_token_id
    assert len({tok.bos_token_id, tok.eos_token_id, tok.eot_token_id, tok.mask_token_id}) == 4
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.encode("<|mdm_mask|>") == [tok.mask_token_id]


def test_shipped_asset_is_committed_and_small():
    size = sum(os.path.getsize(os.path.join(ASSET, f)) for f in os.listdir(ASSET))
    assert size <= 20 * 2**20
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(ASSET, "model.safetensors")], cwd=REPO)
    assert ignored.returncode == 1  # not ignored


@pytest.mark.timeout(120)
def test_shipped_asset_loads_and_answers():
    """Through the loader, LLaDA's reference decoding (train_tiny.generate)
    answers held-out questions of the families the model card says it has
    learned, and the engine (kernels, sampler, batching) gives the reference's
    tokens exactly for every family, wrong answers included."""
    import torch

    import train_tiny
    from dfastllm import LLM, SamplingParams
    from dfastllm.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(ASSET)
    tok = loaded.tokenizer
    assert loaded.family == "llada"
    assert (loaded.mask_token_id, loaded.eos_token_id, loaded.eot_token_id) == (
        tok.mask_token_id, tok.eos_token_id, tok.eot_token_id)
    assert loaded.config.vocab_size >= tok.vocab_size
    tasks = tiny_tasks.held_out_set(4)
    reference = train_tiny.generate(loaded.model, [train_tiny.prompt_ids(tok, t) for t in tasks], tok.mask_token_id)
    learned = [tiny_tasks.check(t, train_tiny.answer_text(tok, out)) for t, out in zip(tasks, reference)
               if t.family in ("sort", "reverse", "copy", "facts")]
    assert sum(learned) >= len(learned) - 1  # 16 questions; the card's accuracy there is 98-100%
    stops = {tok.eos_token_id, tok.eot_token_id}
    engine = LLM(ASSET, device="cpu").chat([[{"role": "user", "content": t.prompt}] for t in tasks],
                                           SamplingParams(max_tokens=32, temperature=0.0))
    for task, ref, out in zip(tasks, reference, engine):
        end = next(i for i, t in enumerate(ref) if t in stops)
        assert out.token_ids == ref[:end], task

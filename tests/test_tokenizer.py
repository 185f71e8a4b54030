import json
import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from dfastllm.testing import write_tiny_dream, write_tiny_llada
from dfastllm.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

TEXTS = ["Hello, world! How are you?", "héllo 世界 🙂", "  two  spaces\n\tand a tab",
         "def add(a, b):\n    return a + b", ""]
CHATS = [
    [{"role": "user", "content": "What is the capital of France? 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": " héllo 世界 "}],
]


@pytest.fixture(scope="module", params=["llada", "dream"])
def checkpoint(request, tmp_path_factory):
    write = write_tiny_llada if request.param == "llada" else write_tiny_dream
    return request.param, write(tmp_path_factory.mktemp(request.param))


def test_matches_transformers_auto_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    family, directory = checkpoint
    ours, theirs = Tokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.vocab_size == len(theirs)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for text in TEXTS:
        for special in (False, True):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(
                text, add_special_tokens=special)
    for chat in CHATS:
        prompt = ours.apply_chat_template(chat)
        assert prompt == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = ours.encode(prompt)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    expected_eot = {"llada": "<|eot_id|>", "dream": "<|im_end|>"}[family]
    assert ours.eot_token_id == theirs.convert_tokens_to_ids(expected_eot)
    expected_mask = {"llada": "<|mdm_mask|>", "dream": "<|mask|>"}[family]
    assert ours.mask_token_id == theirs.convert_tokens_to_ids(expected_mask)
    if family == "llada":
        assert prompt.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
        assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def _stream(tokenizer, ids, chunk):
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [decoder.flush()]


def test_incremental_decoding_of_byte_level_bpe(checkpoint):
    tokenizer = Tokenizer.from_pretrained(checkpoint[1])
    text = "héllo 世界 🙂 and ça va? 你好"
    ids = tokenizer.encode(text)
    # The test means something only if characters span several tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    for chunk in (1, 2, 3):
        pieces = _stream(tokenizer, ids, chunk)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoding_random_text_and_chunks(checkpoint):
    tokenizer = Tokenizer.from_pretrained(checkpoint[1])
    rng = random.Random(0)
    for _ in range(300):
        ids = tokenizer.encode("".join(rng.choice("ab é世界🙂ç\n你") for _ in range(rng.randint(0, 16))))
        if rng.random() < 0.3:
            ids.insert(rng.randint(0, len(ids)), tokenizer.eot_token_id)
        decoder, pieces, i = tokenizer.incremental_decoder(), [], 0
        while i < len(ids):
            n = rng.randint(1, 4)
            pieces.append(decoder.push(ids[i:i + n]))
            i += n
        pieces.append(decoder.flush())
        assert "".join(pieces) == tokenizer.decode(ids)
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoding_skips_special_tokens(checkpoint):
    tokenizer = Tokenizer.from_pretrained(checkpoint[1])
    ids = tokenizer.encode("Hi 🙂") + [tokenizer.eot_token_id] + tokenizer.encode(" bye")
    assert "".join(_stream(tokenizer, ids, 1)) == "Hi 🙂 bye" == tokenizer.decode(ids)


def test_incremental_decoding_flushes_an_incomplete_character(checkpoint):
    tokenizer = Tokenizer.from_pretrained(checkpoint[1])
    ids = tokenizer.encode("ok 🙂")
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    decoder = tokenizer.incremental_decoder()
    assert decoder.push(ids[:cut]) == "ok "  # the broken emoji is held back
    assert decoder.flush() == tokenizer.decode(ids[:cut])[3:]  # and given up at the end


def test_incremental_decoding_with_word_boundary_markers(tmp_path):
    # SentencePiece-style: "▁" marks a word start, bytes fall back to <0xNN>,
    # and the decoder strips the leading space of a sequence.
    vocab = {"<unk>": 0, "<eos>": 1} | {f"<0x{b:02X}>": 2 + b for b in range(256)}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "ll", "▁w", "▁wo", "▁h", "▁he", "▁hell"]:
        vocab[piece] = len(vocab)
    merges = [("l", "l"), ("▁", "w"), ("▁w", "o"), ("▁", "h"), ("▁h", "e"), ("▁he", "ll")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    tokenizer = Tokenizer.from_pretrained(tmp_path)

    text = "hello wörld héllo 世界"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    naive = "".join(tokenizer.decode([i]) for i in ids)
    assert naive != text  # token-by-token decoding loses the spaces and breaks bytes
    for chunk in (1, 2):
        pieces = _stream(tokenizer, ids, chunk)
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_import_is_torch_and_transformers_free():
    code = ("import sys, dfastllm.tokenizer; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

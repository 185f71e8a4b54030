"""Token ids to text: stop strings that span chunks, held-back tails, and
multi-byte characters split across tokens (with the tiny checkpoint's
byte-level tokenizer)."""

from __future__ import annotations

import random

from server.streaming import ChoiceText, StopStrings


def feed(stops, pieces):
    matcher = StopStrings(stops)
    out, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return out, stopped


def test_stop_string_spanning_chunks_is_cut_with_everything_after():
    out, stopped = feed(["STOP"], ["hello S", "T", "OP and more"])
    assert "".join(out) == "hello " and stopped
    # Only the possible beginning of the stop string was held back.
    assert out[0] == "hello "


def test_a_false_start_is_released():
    out, stopped = feed(["STOP"], ["ab ST", "x", "y"])
    assert not stopped
    assert out == ["ab ", "STx", "y", ""]


def test_earliest_of_several_stop_strings_wins():
    out, stopped = feed(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert "".join(out) == "hel" and stopped


def test_unfinished_prefix_at_the_end_is_flushed():
    out, stopped = feed(["\n\n"], ["line\n"])
    assert out == ["line", "\n"] and not stopped


def test_random_chunkings_agree_with_the_whole_text():
    rng = random.Random(7)
    alphabet = "ab \n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        out, stopped = feed(stops, pieces)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert "".join(out) == (text[:min(hits)] if hits else text), (text, stops, pieces)
        assert stopped == bool(hits)


def test_multibyte_characters_split_across_tokens_never_break(tiny_model):
    tokenizer = tiny_model.tokenizer
    text = "héllo wörld, ça va? 世界 你好 🙂 done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()), "the byte-level tokenizer should split the non-ASCII characters"
    choice = ChoiceText(tokenizer, None)
    pieces = []
    for token in ids:  # one token at a time, as the slowest engine would commit them
        piece, _ = choice.push([token])
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(choice.flush()[0])
    assert "".join(pieces) == tokenizer.decode(ids)
    assert choice.num_tokens == len(ids)


def test_stop_string_over_token_boundaries(tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer.encode("The capital of France is Paris. The end")
    choice = ChoiceText(tokenizer, ["Paris."])
    out = []
    for i in range(0, len(ids), 2):
        text, stopped = choice.push(ids[i:i + 2])
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "The capital of France is "


def test_tokens_are_counted_up_to_the_one_that_completes_the_stop_string(tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer.encode("one two three four five six")
    needed = next(k for k in range(1, len(ids) + 1) if "three" in tokenizer.decode(ids[:k]))
    choice = ChoiceText(tokenizer, ["three"])
    text, stopped = choice.push(ids)  # the whole block in one event
    assert stopped and text == "one two " and choice.num_tokens == needed < len(ids)

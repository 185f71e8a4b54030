"""Chat instruction tasks with checkable answers for the embedded tiny model.

Everything is generated here from a seed; nothing is downloaded. Each task
family produces (prompt, answer) pairs whose answers a checker can verify
exactly. The held-out split is decided by a stable hash of what a question
is about, so the training stream and the evaluation set never share a
question, whatever the seed:

- arithmetic: the (a, op, b) triple (0..99, differences never negative);
  10% of triples are held out.
- sort: the list of numbers (3 to 6 of 0..9); 10% of lists are held out.
- reverse: the word; 10% of words are held out (for every template).
- count: the (word, letter) pair; 10% of pairs are held out.
- copy: the phrase; 10% of phrases are held out.
- facts: the facts themselves (capitals, opposites) must be learned, so they
  all appear in training; the held-out questions ask them with phrasings
  (templates) that never occur in training.

The `chat` family (greetings, "what can you do?") only makes the model
polite out of the box; it has no held-out part and is not scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

HELD_OUT_PERCENT = 10

# Common short English words: the real-word part of the word pool.
WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat
bell belt best bird blue boat body bone book boot born boss both bowl bread
brick bride brown build burn busy cake call calm camp card care cart case cash
cast cat chair chalk cheap chess chin city clay clock cloud coal coat code cold
cook cool copy corn cost crab crew crow cube cup dark dash date dawn deal deer
desk dice dish dive dock doll door dove down draw dream dress drum duck dust
eagle early earth east echo edge egg elbow empty fact fair farm fast fern field
fire fish flag flat flour flute foam fog food foot fork fox frog fruit game gate
gift girl glad glass glove goat gold golf good grape grass green grid hair hall
hand happy hard harp hat hawk heart heat hill home honey hook horse house ice
idea iron island jam jar jazz jelly jewel juice jump kettle key king kite knee
knife lake lamp land leaf lemon light lime lion list lock long lunch magic map
maple mask meal melon milk mint moon moss mouse mud music nail name nest net
night noise north nose note nut oak ocean olive onion orange owl page paint
pan paper park pearl pen pencil piano pig pink pipe plane plant plum pond pool
potato queen quiet rabbit rain river road robot rock roof rope rose ruby salt
sand seed shell ship shoe silk silver sky snow soap sock sofa song soup star
stone storm sugar sun swan table tiger toast tomato tower town toy train tree
truck tulip van vase violin wall water wave whale wheat wind window wolf wood
yard yarn zebra zero banana apple cherry letter mirror bottle coffee pepper
summer winter yellow purple button rocket planet garden forest dragon castle
""".split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo", "Russia": "Moscow",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Cuba": "Havana",
    "India": "New Delhi", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Australia": "Canberra", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires",
    "England": "London", "Belgium": "Brussels", "Nepal": "Kathmandu",
    "Ghana": "Accra", "Nigeria": "Abuja", "Morocco": "Rabat", "Korea": "Seoul",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
    "light": "dark", "open": "closed", "old": "new", "early": "late", "full": "empty",
    "hard": "soft", "high": "low", "long": "short", "rich": "poor", "wet": "dry",
    "day": "night", "left": "right", "true": "false", "win": "lose", "push": "pull",
    "in": "out", "yes": "no", "good": "bad", "strong": "weak", "near": "far",
    "first": "last", "begin": "end", "buy": "sell", "give": "take", "love": "hate",
    "thick": "thin", "loud": "quiet", "clean": "dirty", "heavy": "light", "north": "south",
    "east": "west", "young": "old", "inside": "outside", "above": "below", "top": "bottom",
}

# Facts: templates seen in training, and the phrasings kept for evaluation.
CAPITAL_TEMPLATES_TRAIN = [
    "What is the capital of {x}?", "What's the capital of {x}?", "Capital of {x}?",
    "Name the capital of {x}.", "The capital of {x} is?", "capital of {x}",
]
CAPITAL_TEMPLATES_HELD_OUT = ["Which city is the capital of {x}?", "Tell me the capital of {x}."]
OPPOSITE_TEMPLATES_TRAIN = [
    "What is the opposite of {x}?", "What's the opposite of {x}?", "Opposite of {x}?",
    "Name the opposite of {x}.", "The opposite of {x} is?", "opposite of {x}",
]
OPPOSITE_TEMPLATES_HELD_OUT = ["Which word is the opposite of {x}?", "Tell me the opposite of {x}."]

CHAT_ANSWERS = {
    "Hello": "Hello! I am tiny-llada.", "Hello!": "Hello! I am tiny-llada.",
    "Hi": "Hello! I am tiny-llada.", "Hi!": "Hello! I am tiny-llada.",
    "Hey": "Hello! I am tiny-llada.", "hello": "Hello! I am tiny-llada.",
    "hi": "Hello! I am tiny-llada.", "Who are you?": "I am tiny-llada.",
    "What are you?": "A tiny diffusion model.", "What is your name?": "tiny-llada",
    "What can you do?": "Math, sorting, words, facts.",
    "Help": "Try: What is 12 + 30?", "help": "Try: What is 12 + 30?",
    "Thanks": "You are welcome!", "Thank you!": "You are welcome!",
}


@dataclasses.dataclass(frozen=True)
class Task:
    family: str
    prompt: str
    answer: str


def is_held_out(family: str, key: str) -> bool:
    """Stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(f"{family}:{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 100 < HELD_OUT_PERCENT


def _pseudo_word(rng: random.Random) -> str:
    """Letter strings so reversal and counting generalise beyond the word list."""
    if rng.random() < 0.5:
        syllables = [rng.choice("bcdfghklmnprstvwz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4))]
        return "".join(syllables)[: rng.randint(3, 8)]
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.5 else _pseudo_word(rng)


def worked_sum(a: int, b: int) -> str:
    """Column addition written out, units first: "7+5=12, 3+4+1=8, so 82".
    Each step needs two digits that sit just before it, which a tiny model
    learns quickly; the plain sum needs two digits found far back in the
    question at once, where it stalled for thousands of steps."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    carry = "+1" if units >= 10 else ""
    return f"{a % 10}+{b % 10}={units}, {a // 10}+{b // 10}{carry}={tens}, so {a + b}"


def worked_difference(a: int, b: int) -> str:
    """Column subtraction (a >= b) written out, units first, borrowing:
    "12-7=5, 8-1-3=4, so 45" for 82 - 37."""
    borrow = a % 10 < b % 10
    units = a % 10 + 10 * borrow - b % 10
    tens = a // 10 - borrow - b // 10
    return (f"{a % 10 + 10 * borrow}-{b % 10}={units}, {a // 10}{'-1' if borrow else ''}-{b // 10}={tens}, "
            f"so {a - b}")


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        templates = ["What is {a} + {b}?", "{a} + {b} = ?", "Compute {a} plus {b}.", "Add {a} and {b}."]
        return f"{a}+{b}", rng.choice(templates).format(a=a, b=b), worked_sum(a, b)
    a, b = max(a, b), min(a, b)  # differences stay whole numbers, 0..99
    templates = ["What is {a} - {b}?", "{a} - {b} = ?", "Compute {a} minus {b}.", "Subtract {b} from {a}."]
    return f"{a}-{b}", rng.choice(templates).format(a=a, b=b), worked_difference(a, b)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    listed = ", ".join(map(str, numbers))
    templates = ["Sort these numbers: {xs}", "Sort {xs} from smallest to largest.", "Put in order: {xs}"]
    return listed, rng.choice(templates).format(xs=listed), ", ".join(map(str, sorted(numbers)))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    templates = ["Reverse the word {w}.", "Spell {w} backwards.", "Reverse: {w}"]
    return word, rng.choice(templates).format(w=word), word[::-1]


# Answers of the count family, drawn first: words rarely repeat a letter, so
# questions about the word's own letters are ~75% "1", and a tiny model that
# always says "1" scores that without counting anything.
COUNT_ANSWERS = {0: 0.2, 1: 0.3, 2: 0.3, 3: 0.2}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
COUNT_MAX_LETTERS = 7  # "x: " + 7 steps of 3 + ", so n" + <|eot_id|> = 31 tokens, inside the 32-token block


def _word_with(rng: random.Random, letter: str, times: int) -> str:
    """A word holding `letter` exactly `times` times: a pool word when one of
    the right kind is drawn, else a letter string with the letter planted."""
    word = _word(rng)
    if word.count(letter) == times:
        return word
    others = [c for c in ALPHABET if c != letter]
    chars = [c if c != letter else rng.choice(others) for c in _pseudo_word(rng)]
    del chars[COUNT_MAX_LETTERS:]
    while len(chars) < times + 2:
        chars.append(rng.choice(others))
    for i in rng.sample(range(len(chars)), times):
        chars[i] = letter
    return "".join(chars)


def tally(word: str, letter: str) -> str:
    """Counting written out: the asked letter, then each letter of the word
    with a mark (+ if it is the asked one, - if not) and the running count:
    "r: s-0t-0r+1a-1w-1b-1r+2, so 2". Each mark compares one letter with the
    asked letter, restated at a fixed place at the start of the answer; each
    count adds the mark just before it to the count three tokens back. With
    the comparison and the sum in separate tokens, every token is one simple
    step. No spaces: seven letters fit the 32-token block."""
    count, steps = 0, []
    for char in word:
        count += char == letter
        steps.append(f"{char}{'+' if char == letter else '-'}{count}")
    return f"{letter}: {''.join(steps)}, so {count}"


def _count(rng: random.Random) -> tuple[str, str, str]:
    times = rng.choices(list(COUNT_ANSWERS), list(COUNT_ANSWERS.values()))[0]
    word = _word(rng)
    while len(word) > COUNT_MAX_LETTERS:
        word = _word(rng)
    # Letters of this word that give the drawn answer; with none, plant one.
    candidates = [c for c in sorted(set(word)) if word.count(c) == times] if times else \
        [c for c in ALPHABET if c not in word]
    letter = rng.choice(candidates) if candidates else rng.choice(ALPHABET)
    if not candidates:
        word = _word_with(rng, letter, times)
    templates = [
        "How many times does the letter {c} appear in {w}?",
        "How many {c}'s are in {w}?",
        "Count the letter {c} in {w}.",
    ]
    return f"{word}/{letter}", rng.choice(templates).format(c=letter, w=word), tally(word, letter)


def _copy(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
    while len(" ".join(words)) > 24:  # keep the answer short
        words.pop()
    phrase = " ".join(words)
    templates = ["Repeat after me: {p}", "Copy this: {p}", "Echo: {p}"]
    return phrase, rng.choice(templates).format(p=phrase), phrase


GENERATORS = {"arithmetic": _arithmetic, "sort": _sort, "reverse": _reverse, "count": _count, "copy": _copy}


def _facts(rng: random.Random, held_out: bool) -> Task:
    table, train, held = (
        (CAPITALS, CAPITAL_TEMPLATES_TRAIN, CAPITAL_TEMPLATES_HELD_OUT)
        if rng.random() < 0.5
        else (OPPOSITES, OPPOSITE_TEMPLATES_TRAIN, OPPOSITE_TEMPLATES_HELD_OUT)
    )
    key = rng.choice(sorted(table))
    template = rng.choice(held if held_out else train)
    return Task("facts", template.format(x=key), table[key])


def sample_task(family: str, rng: random.Random, *, held_out: bool) -> Task:
    """One question of `family` from the training side or the held-out side."""
    if family == "facts":
        return _facts(rng, held_out)
    if family == "chat":
        if held_out:
            raise ValueError("the chat family has no held-out part")
        prompt = rng.choice(sorted(CHAT_ANSWERS))
        return Task("chat", prompt, CHAT_ANSWERS[prompt])
    while True:  # rejection sampling; about 1 in 10 (or 9 in 10) draws is kept
        key, prompt, answer = GENERATORS[family](rng)
        if is_held_out(family, key) == held_out:
            return Task(family, prompt, answer)


# Mixture of the training stream: harder families get more of it.
TRAIN_MIX = {
    "arithmetic": 0.34, "sort": 0.13, "reverse": 0.05, "count": 0.28,
    "copy": 0.05, "facts": 0.11, "chat": 0.04,
}
# Mixture of the first steps (curriculum): mostly the copying families, whose
# clean signal grows the look-up ("induction") circuits every family needs;
# from a cold start those take thousands of steps to appear in TRAIN_MIX.
WARMUP_MIX = {
    "arithmetic": 0.08, "sort": 0.06, "reverse": 0.3, "count": 0.08,
    "copy": 0.3, "facts": 0.15, "chat": 0.03,
}
SCORED_FAMILIES = ("arithmetic", "sort", "reverse", "count", "copy", "facts")


def sample_training_task(rng: random.Random, mix: dict[str, float]) -> Task:
    families, weights = zip(*mix.items())
    return sample_task(rng.choices(families, weights)[0], rng, held_out=False)


def training_stream(seed: int):
    """Endless deterministic stream of training tasks (the TRAIN_MIX part)."""
    rng = random.Random(seed)
    while True:
        yield sample_training_task(rng, TRAIN_MIX)


def held_out_set(per_family: int, seed: int = 1234) -> list[Task]:
    """Distinct held-out questions, `per_family` of every scored family."""
    rng = random.Random(seed)
    tasks: list[Task] = []
    for family in SCORED_FAMILIES:
        seen: set[str] = set()
        for _ in range(per_family * 50):
            if len(seen) == per_family:
                break
            task = sample_task(family, rng, held_out=True)
            if task.prompt not in seen:
                seen.add(task.prompt)
                tasks.append(task)
    return tasks


def check(task: Task, reply: str) -> bool:
    """Exact match after trimming whitespace and a trailing full stop."""
    return reply.strip().rstrip(".").strip() == task.answer

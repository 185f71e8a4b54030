"""Chat questions the embedded tiny model answers with text (one of each of
its task families, in the phrasings of tools/tiny_tasks.py), for the load
generators of this folder. Plain-text completion prompts make that model
answer with nothing at all, so a load test of the default model asks these.
Each answer fits one 32-token block and ends with EOS."""

from __future__ import annotations

CHAT_QUESTIONS = [
    "What is 37 + 45?",
    "Subtract 18 from 72.",
    "Sort 1, 6, 2, 0, 4 from smallest to largest.",
    "Reverse the word tiger.",
    "How many a's are in planet?",
    "Echo: stone fruit paint",
    "Tell me the capital of Japan.",
    "What is the opposite of hot?",
    "What can you do?",
]
# Long enough for every answer above; the engine stops at EOS.
MAX_TOKENS = 32


def chat_body(model: str, turn: int, *, stream: bool, max_tokens: int = MAX_TOKENS) -> dict:
    """A /v1/chat/completions body: the `turn`-th question (round robin)."""
    question = CHAT_QUESTIONS[turn % len(CHAT_QUESTIONS)]
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": stream}

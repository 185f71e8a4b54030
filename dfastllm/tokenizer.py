"""Tokenizer of a checkpoint directory: `tokenizer.json` through the
`tokenizers` library plus `tokenizer_config.json` (special tokens, chat
template).

Torch-free and transformers-free on purpose: every HTTP worker imports this
module, and importing transformers would cost seconds at worker start. The
chat template is rendered the way transformers renders it (sandboxed jinja2
with `trim_blocks`/`lstrip_blocks`, `raise_exception`, a non-escaping
`tojson`, the named special tokens as variables), so prompts match the
model's training format byte for byte.
"""

from __future__ import annotations

import datetime
import functools
import json
import os

import tokenizers

# Special-token names transformers passes to chat templates (its
# `SPECIAL_TOKENS_ATTRIBUTES`).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token",
                        "pad_token", "cls_token", "mask_token")
# End-of-turn tokens of the chat formats we serve (Llama-3 headers, ChatML,
# LLaDA2's Ling roles).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|role_end|>")
# Mask tokens of LLaDA and Dream, for tokenizer configs that do not name one.
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>")


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, tokenizer_config: dict,
                 chat_template: str | None):
        self.backend = backend
        self.chat_template = chat_template
        self.clean_up_spaces = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))
        self.special_tokens = {
            name: _token_content(tokenizer_config[name])
            for name in NAMED_SPECIAL_TOKENS if tokenizer_config.get(name) is not None
        }
        if "mask_token" not in self.special_tokens:
            known = [t for t in MASK_TOKENS if backend.token_to_id(t) is not None]
            if known:
                self.special_tokens["mask_token"] = known[0]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(self.special_tokens.get("eos_token"))
        self.pad_token_id = self._id_of(self.special_tokens.get("pad_token"))
        self.mask_token_id = self._id_of(self.special_tokens.get("mask_token"))
        self.eot_token_id = next(
            (i for i in map(backend.token_to_id, END_OF_TURN_TOKENS) if i is not None), None)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        directory = os.fspath(directory)
        tokenizer_file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"no tokenizer: {tokenizer_file} does not exist")
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        config = {}
        # transformers reads special_tokens_map.json too; tokenizer_config.json wins.
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    config.update(json.load(f))
        return cls(backend, config, _read_chat_template(directory, config))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        variables = {**self.special_tokens, **template_kwargs}
        return _compile_template(self.chat_template).render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **variables)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Turns a growing stream of token ids into text pieces.

    Decoding token by token is wrong for byte-level BPE (a character can span
    tokens) and for word-boundary markers (a leading "▁" becomes a space only
    after a previous word). So each push decodes a short window twice: the
    tokens since `prefix_offset` that are fully emitted, and the whole
    window; the difference is the new text. A trailing run of U+FFFD is an
    incomplete UTF-8 sequence: the text before it is emitted now, the rest
    once later tokens complete it (or at `flush`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0    # tokens before this are fully emitted
        self.emitted = 0        # characters emitted from the tokens after read_offset

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _unread_text(self) -> str:
        done = self._decode(self.ids[self.prefix_offset:self.read_offset])
        return self._decode(self.ids[self.prefix_offset:])[len(done):]

    def push(self, ids) -> str:
        self.ids.extend(ids)
        text = self._unread_text()
        complete = text.rstrip("\ufffd")
        new = complete[self.emitted:]
        if len(complete) < len(text):  # wait for the rest of the character
            self.emitted = max(self.emitted, len(complete))
        elif text:
            self.prefix_offset, self.read_offset, self.emitted = self.read_offset, len(self.ids), 0
        return new

    def flush(self) -> str:
        """Whatever is held back (an invalid byte sequence decodes to U+FFFD here,
        as in a full decode)."""
        text = self._unread_text()[self.emitted:]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.emitted = 0
        return text


def _token_content(value) -> str:
    # tokenizer_config.json stores a special token as a string or as a
    # serialized AddedToken {"content": ..., ...}.
    return value["content"] if isinstance(value, dict) else str(value)


def _read_chat_template(directory: str, config: dict) -> str | None:
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _clean_up_spaces(text: str) -> str:
    # transformers' `clean_up_tokenization`, applied when the config asks for it.
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    # jinja2 is imported here, not at module import, to keep worker start fast.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)

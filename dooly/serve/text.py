"""Counting a request's prompt tokens, and the filler text a simulated deployment streams back.

With a tokenizer (`--tokenizer PATH`: a tokenizer.json, or a folder holding one) the count is the
model's; without one it is approximate (4 characters per token, the usual English rule of thumb),
and the server says which (`TokenCounter.exact`, the start-up line, `/v1/models`)."""

from __future__ import annotations

import json
from pathlib import Path

from dooly.errors import DoolyError

CHARS_PER_TOKEN = 4
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")


class TokenCounter:
    """`tokenizer`: a tokenizer.json or its folder; "words": the catalog's word tokenizer for `config`
    (`dooly.catalog.tokenizer`: one word, one token; what `dooly export tokenizer` writes for vLLM)."""

    def __init__(self, tokenizer: str | None = None, config: dict | None = None):
        self.tokenizer = None
        self.chat_template = None
        self.special: dict = {}
        self.source = "approximate: 4 characters per token"
        if tokenizer is None:
            return
        if tokenizer == "words":
            from dooly.catalog.tokenizer import adds_bos, build_tokenizer, chat_template, special_tokens

            if config is None:
                raise DoolyError("--tokenizer words needs the model's config")
            self.tokenizer = build_tokenizer(config)
            self.chat_template = chat_template(adds_bos(config))
            self.special = {f"{role}_token": r[0] for role, r in special_tokens(config).items()
                            if r and role in ("bos", "eos")}
            self.source = "exact: the catalog's word tokenizer (one word, one token)"
            return
        from tokenizers import Tokenizer

        path = Path(tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DoolyError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the library's parse error, on one line
            raise DoolyError(f"--tokenizer {tokenizer}: not a tokenizers file ({str(e).splitlines()[0]})") from None
        conf = file.parent / "tokenizer_config.json"
        if conf.is_file():
            try:
                c = json.loads(conf.read_text())
            except ValueError:
                raise DoolyError(f"--tokenizer {tokenizer}: tokenizer_config.json is not JSON") from None
            self.chat_template = c.get("chat_template")
            self.special = {k: v for k, v in c.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
        self.source = f"exact: {file}"

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text).ids)
        return max(1, round(len(text) / CHARS_PER_TOKEN)) if text else 0

    def count_chat(self, messages: list[dict]) -> int:
        """Tokens of the chat prompt: the tokenizer's chat template rendered (generation prompt added),
        without special tokens added again; else the messages' text joined by newlines."""
        if self.tokenizer is not None and self.chat_template:
            import jinja2

            text = jinja2.Environment().from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, **self.special)
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return self.count("\n".join(_content(m) for m in messages))

    def piece(self, index: int, request_number: int) -> str:
        """The text of output token `index`: a token of the vocabulary rendered by the tokenizer, or a word."""
        if self.tokenizer is not None:
            vocab = self.tokenizer.get_vocab_size()
            tid = (request_number * 131 + index * 17) % vocab
            for k in range(64):  # special tokens decode to nothing: take the next id that renders
                text = self.tokenizer.decode([(tid + k) % vocab]).strip()
                if text:
                    break
            return f" {text}" if index else text
        word = WORDS[(request_number + index) % len(WORDS)]
        return f" {word}" if index else word


def _content(message: dict) -> str:
    c = message.get("content")
    if isinstance(c, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ""

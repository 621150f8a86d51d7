"""A prompt's way to token ids: validate the text, render chat messages, tokenize, check the length.

Used by the `preprocessing` model (batched by Triton) and, with `models.ensemble.tokenize: entry`,
by the entry model itself for one request at a time (no process hop to preprocessing and back).

Chat (`apply_chat_template: true`): `text_input` is a JSON list of {"role", "content"} messages
(or plain text: one user message), rendered with the tokenizer's chat template. A model without a
template (a base model, such as the default stories260K) gets the documented default: the
messages' contents joined by newlines, no role markers, so the model continues the conversation's
text (docs/contract.md, "Chat").
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from . import limits as lim
from . import triton_io as io
from .batching.sampling import InvalidParameter


class Prompter:
    """Text -> token ids for one model (its tokenizer folder) under `limits`."""

    def __init__(self, tokenizer_dir: Path, limits: lim.Limits):
        from transformers import AutoTokenizer

        self.limits = limits
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        # the entry prepares prompts on many threads; a fast tokenizer is a Rust object that one
        # thread may borrow mutably ("Already borrowed"), so one prompt at a time
        self._lock = threading.Lock()

    def text(self, inputs: dict) -> tuple[str, bool]:
        """The prompt's text, and whether a chat template rendered it (it then holds its special
        tokens; a plain prompt gets the ones the tokenizer adds). InvalidParameter names a problem."""
        raw = io.check_batch_of_one(inputs, "text_input").reshape(-1)
        if raw.size != 1:
            raise InvalidParameter(f"input 'text_input' must hold exactly one value, got {raw.size}")
        text = lim.text(raw[0], "text_input", self.limits.prompt_bytes)
        lim.words(inputs, "stop_words", self.limits)  # validated early, with a clear message
        if not lim.flag(inputs, "apply_chat_template"):
            return text, False
        messages = parse_messages(text)
        if not self.has_template:
            return default_chat_text(messages), False
        try:
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and what a template raises
            raise InvalidParameter(f"the model's chat template refused these messages: {_first_line(exc)}") from None
        return rendered, True

    def encode(self, texts: list[str], add_special: bool) -> list[list[int]]:
        """One tokenizer call for many texts."""
        return self.tokenizer(texts, add_special_tokens=add_special)["input_ids"]

    def check(self, inputs: dict, ids) -> list[int]:
        """The prompt's length against the context; returns the bad words' ids (each word ended by
        -1; [-1] for none), as the generator reads them."""
        n = len(ids)
        if n + 1 > self.limits.max_seq_len:
            raise InvalidParameter(f"prompt is {n} tokens; the model's context is {self.limits.max_seq_len} tokens "
                                   "and at least one must remain for the answer")
        bad = []
        for word in lim.words(inputs, "bad_words", self.limits):
            bad += self.tokenizer(word, add_special_tokens=False)["input_ids"] + [-1]
        return bad or [-1]

    def prepare(self, inputs: dict) -> tuple[list[int], list[int]]:
        """One request: (input_ids, bad_words_ids)."""
        with self._lock:
            text, templated = self.text(inputs)
            ids = self.encode([text], not templated)[0]
            return ids, self.check(inputs, ids)


def prompt_tensors(ids, bad) -> list:
    """A prepared prompt as the generator reads it: input_ids, input_length, bad_words_ids."""
    return [io.tensor("input_ids", ids, np.int32), io.tensor("input_length", [len(ids)], np.int32),
            io.tensor("bad_words_ids", bad, np.int32)]


ROLES = ("system", "user", "assistant", "developer", "tool")


def parse_messages(text: str) -> list[dict]:
    """`text_input` of a chat request: a JSON list of {"role", "content"} messages, or plain text
    (one user message). A text that starts as a JSON list but is not a valid message list is
    refused, naming what is wrong (it was silently sent as the prompt before)."""
    if not text.lstrip().startswith("["):
        return [{"role": "user", "content": text}]
    try:
        msgs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParameter(f"apply_chat_template: text_input is not valid JSON: {exc.msg} "
                               f"(line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(msgs, list) or not msgs:
        raise InvalidParameter("apply_chat_template: text_input must be a non-empty JSON list of messages")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise InvalidParameter(f"apply_chat_template: message {k} is not an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidParameter(f"apply_chat_template: message {k} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidParameter(f"apply_chat_template: message {k} needs a string 'content'")
    return msgs


def default_chat_text(messages: list[dict]) -> str:
    """The documented rendering for a model without a chat template: the contents, one per line."""
    return "\n".join(m["content"] for m in messages)


def _first_line(exc: Exception) -> str:
    msg = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return (msg[0] if msg else type(exc).__name__)[:300]

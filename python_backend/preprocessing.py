"""`preprocessing`: validate the prompt, render chat messages, tokenize (batched by Triton).

Each request of a dynamic batch succeeds or fails alone: a message the chat template refuses, a
prompt over the byte cap or invalid UTF-8 fails its own request with a message naming the problem
(INVALID_ARG), never the batch (an exception out of `execute` would fail every request in it with
one request's error text).

Chat (`apply_chat_template: true`): `text_input` is a JSON list of {"role", "content"} messages
(or plain text: one user message), rendered with the tokenizer's chat template. A model without a
template (a base model, such as the default stories260K) gets the documented default: the
messages' contents joined by newlines, no role markers, so the model continues the conversation's
text (docs/contract.md, "Chat").
"""

from __future__ import annotations

import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from . import limits as lim
from . import triton_io as io
from .batching.sampling import InvalidParameter

log = logging.getLogger("tritonchat.preprocessing")


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        _, params, version_dir = io.model_setup(args)
        self.limits = lim.Limits.from_params(params)
        self.tokenizer = AutoTokenizer.from_pretrained(str(version_dir / "tokenizer"))
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))

    def execute(self, requests):
        responses = [None] * len(requests)
        inputs = [io.inputs(r) for r in requests]
        plain, templated = {}, {}
        for i, inp in enumerate(inputs):
            try:
                text, is_templated = self._prompt(inp)
                (templated if is_templated else plain)[i] = text
            except InvalidParameter as exc:
                responses[i] = io.error_response(str(exc))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("preprocessing failed")
                responses[i] = io.error_response(f"could not prepare this prompt ({type(exc).__name__})")
        ids = {}
        for group, add_special in ((plain, True), (templated, False)):
            if group:
                ids.update(self._tokenize(group, add_special, responses))
        for i, token_ids in ids.items():
            try:
                responses[i] = self._respond(inputs[i], token_ids)
            except InvalidParameter as exc:
                responses[i] = io.error_response(str(exc))
            except Exception as exc:  # noqa: BLE001
                log.exception("preprocessing failed")
                responses[i] = io.error_response(f"could not prepare this prompt ({type(exc).__name__})")
        return responses

    def _tokenize(self, group: dict, add_special: bool, responses: list) -> dict:
        """One tokenizer call for the whole group (a rendered chat template already holds its special
        tokens; a plain prompt gets the ones the tokenizer adds); one call per text if that fails."""
        try:
            enc = self.tokenizer(list(group.values()), add_special_tokens=add_special)["input_ids"]
            return dict(zip(group.keys(), enc))
        except Exception:  # noqa: BLE001
            out = {}
            for i, text in group.items():
                try:
                    out[i] = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
                except Exception as exc:  # noqa: BLE001
                    responses[i] = io.error_response(f"could not tokenize this prompt ({type(exc).__name__})")
            return out

    def _prompt(self, inputs: dict) -> tuple[str, bool]:
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

    def _respond(self, inputs: dict, ids):
        n = len(ids)
        if n + 1 > self.limits.max_seq_len:
            raise InvalidParameter(f"prompt is {n} tokens; the model's context is {self.limits.max_seq_len} tokens "
                                   "and at least one must remain for the answer")
        bad = []
        for word in lim.words(inputs, "bad_words", self.limits):
            bad += self.tokenizer(word, add_special_tokens=False)["input_ids"] + [-1]
        return pb_utils.InferenceResponse(output_tensors=[
            io.tensor("input_ids", ids, np.int32),
            io.tensor("input_length", [n], np.int32),
            io.tensor("bad_words_ids", bad or [-1], np.int32),
        ])


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

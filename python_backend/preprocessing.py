"""`preprocessing`: validate the prompt, apply the chat template, tokenize (batched)."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from . import triton_io as io
from .batching.sampling import InvalidParameter


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        _, params, version_dir = io.model_setup(args)
        self.max_seq_len = int(params["max_seq_len"])
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
        # one tokenizer call per kind for the whole dynamic batch; a rendered chat template
        # already holds its special tokens, a plain prompt gets the ones the tokenizer adds
        ids = {}
        for group, add_special in ((plain, True), (templated, False)):
            if group:
                enc = self.tokenizer(list(group.values()), add_special_tokens=add_special)["input_ids"]
                ids.update(zip(group.keys(), enc))
        for i, token_ids in ids.items():
            try:
                responses[i] = self._respond(inputs[i], token_ids)
            except InvalidParameter as exc:
                responses[i] = io.error_response(str(exc))
        return responses

    def _prompt(self, inputs: dict) -> tuple[str, bool]:
        raw = io.check_batch_of_one(inputs, "text_input").reshape(-1)[0]
        try:
            text = raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        except UnicodeDecodeError as exc:
            raise InvalidParameter(f"text_input is not valid UTF-8: {exc}") from None
        if not text.strip():
            raise InvalidParameter("text_input is empty")
        io.strings(inputs, "stop_words")  # validates UTF-8 early, with a clear message
        if not (io.scalar(inputs, "apply_chat_template", bool, False) and self.has_template):
            return text, False
        messages = _messages(text)
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return rendered, True

    def _respond(self, inputs: dict, ids):
        n = len(ids)
        if n + 1 > self.max_seq_len:
            raise InvalidParameter(f"prompt is {n} tokens; the model's context is {self.max_seq_len} tokens "
                                   "and at least one must remain for the answer")
        bad = []
        for word in io.strings(inputs, "bad_words"):
            bad += self.tokenizer(word, add_special_tokens=False)["input_ids"] + [-1]
        return pb_utils.InferenceResponse(output_tensors=[
            io.tensor("input_ids", ids, np.int32),
            io.tensor("input_length", [n], np.int32),
            io.tensor("bad_words_ids", bad or [-1], np.int32),
        ])


def _messages(text: str) -> list[dict]:
    """A JSON list of {role, content} messages, or the text as one user message."""
    if text.lstrip().startswith("["):
        try:
            msgs = json.loads(text)
        except json.JSONDecodeError:
            msgs = None
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                    for m in msgs):
            return msgs
    return [{"role": "user", "content": text}]

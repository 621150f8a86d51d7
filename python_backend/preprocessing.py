"""`preprocessing`: validate the prompt, render chat messages, tokenize (batched by Triton;
prompt.py does the work, also for an entry that tokenizes itself).

Each request of a dynamic batch succeeds or fails alone: a message the chat template refuses, a
prompt over the byte cap or invalid UTF-8 fails its own request with a message naming the problem
(INVALID_ARG), never the batch (an exception out of `execute` would fail every request in it with
one request's error text).
"""

from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils

from . import limits as lim
from . import triton_io as io
from .batching.sampling import InvalidParameter
from .prompt import Prompter, prompt_tensors

log = logging.getLogger("tritonchat.preprocessing")


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = io.model_setup(args)
        self.prompter = Prompter(version_dir / "tokenizer", lim.Limits.from_params(params))

    def execute(self, requests):
        responses = [None] * len(requests)
        inputs = [io.inputs(r) for r in requests]
        plain, templated = {}, {}
        for i, inp in enumerate(inputs):
            try:
                text, is_templated = self.prompter.text(inp)
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
                bad = self.prompter.check(inputs[i], token_ids)
                responses[i] = pb_utils.InferenceResponse(output_tensors=prompt_tensors(token_ids, bad))
            except InvalidParameter as exc:
                responses[i] = io.error_response(str(exc))
            except Exception as exc:  # noqa: BLE001
                log.exception("preprocessing failed")
                responses[i] = io.error_response(f"could not prepare this prompt ({type(exc).__name__})")
        return responses

    def _tokenize(self, group: dict, add_special: bool, responses: list) -> dict:
        """One tokenizer call for the whole group; one call per text if that fails."""
        try:
            return dict(zip(group.keys(), self.prompter.encode(list(group.values()), add_special)))
        except Exception:  # noqa: BLE001
            out = {}
            for i, text in group.items():
                try:
                    out[i] = self.prompter.encode([text], add_special)[0]
                except Exception as exc:  # noqa: BLE001
                    responses[i] = io.error_response(f"could not tokenize this prompt ({type(exc).__name__})")
            return out

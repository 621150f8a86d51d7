"""`postprocessing`: the detokenizer. Stateless: each response carries its token window.

It validates what it gets as if a client sent it (token ids in the vocabulary, offsets inside the
window): a bad window fails its own request, never the batch."""

from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from . import limits as lim
from . import triton_io as io
from .batching.detokenize import delta
from .batching.sampling import InvalidParameter

log = logging.getLogger("tritonchat.postprocessing")
PASS_THROUGH = ("num_input_tokens", "num_output_tokens", "finish_reason")


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = io.model_setup(args)
        self.tokenizer = io.load_fast_tokenizer(version_dir)
        # the model's vocabulary (its logits' width), which may differ from the tokenizer's
        self.vocab_size = int(params.get("vocab_size") or 0) or self.tokenizer.get_vocab_size(with_added_tokens=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(io.inputs(request)))
            except InvalidParameter as exc:
                responses.append(io.error_response(str(exc)))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("postprocessing failed")
                responses.append(io.error_response(f"could not detokenize this response ({type(exc).__name__})"))
        return responses

    def _one(self, inputs: dict):
        tokens = io.optional(inputs, "tokens")
        window = [] if tokens is None else lim.token_ids(tokens, "tokens", self.vocab_size).tolist()
        read_offset = lim.integer(inputs, "read_offset", 0, len(window), 0)
        trim = lim.integer(inputs, "trim_chars", 0, lim.INT32_MAX, 0)
        text = delta(self.tokenizer, window, read_offset, trim)
        outputs = [
            io.bytes_tensor("text_output", text),
            io.tensor("output_ids", window[read_offset:], np.int32),
        ]
        outputs += [pb_utils.Tensor(name, io.optional(inputs, name)) for name in PASS_THROUGH]
        return pb_utils.InferenceResponse(output_tensors=outputs)

"""`postprocessing`: the detokenizer. Stateless: each response carries its token window."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from . import triton_io as io
from .batching.detokenize import delta

PASS_THROUGH = ("num_input_tokens", "num_output_tokens", "finish_reason")


class TritonPythonModel:
    def initialize(self, args):
        _, _, version_dir = io.model_setup(args)
        self.tokenizer = io.load_fast_tokenizer(version_dir)

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = io.inputs(request)
            window = io.optional(inputs, "tokens").reshape(-1).tolist()
            read_offset = io.scalar(inputs, "read_offset", int, 0)
            trim = io.scalar(inputs, "trim_chars", int, 0)
            text = delta(self.tokenizer, window, read_offset, trim)
            outputs = [
                io.bytes_tensor("text_output", text),
                io.tensor("output_ids", window[read_offset:], np.int32),
            ]
            outputs += [pb_utils.Tensor(name, io.optional(inputs, name)) for name in PASS_THROUGH]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

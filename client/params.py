"""Generation parameters and the request they become (tensors for gRPC, JSON for HTTP generate).

Only the fields that are set (not ``None``; for ``stop``/``bad_words`` not empty) are sent, so
the server's defaults (docs/contract.md) apply to everything else.  ``max_tokens`` is required
by the contract and therefore always sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .errors import InvalidRequest

__all__ = ["GenerationParams", "Prompt", "TENSOR_SPECS", "prompt_text", "build_arrays",
           "build_grpc_inputs", "build_json_body"]

# A prompt is a plain string, or a chat: a list of {"role": ..., "content": ...} messages
# (sent as a JSON string; the server renders it with the tokenizer's chat template).
Prompt = Union[str, Sequence[Dict[str, str]]]

# field name -> (tensor name, Triton datatype, numpy dtype)
TENSOR_SPECS = {
    "max_tokens": ("max_tokens", "INT32", np.int32),
    "temperature": ("temperature", "FP32", np.float32),
    "top_k": ("top_k", "INT32", np.int32),
    "top_p": ("top_p", "FP32", np.float32),
    "repetition_penalty": ("repetition_penalty", "FP32", np.float32),
    "presence_penalty": ("presence_penalty", "FP32", np.float32),
    "frequency_penalty": ("frequency_penalty", "FP32", np.float32),
    "seed": ("seed", "UINT64", np.uint64),
    "min_tokens": ("min_tokens", "INT32", np.int32),
    "stop": ("stop_words", "BYTES", np.object_),
    "bad_words": ("bad_words", "BYTES", np.object_),
    "end_id": ("end_id", "INT32", np.int32),
    "pad_id": ("pad_id", "INT32", np.int32),
    "exclude_input_in_output": ("exclude_input_in_output", "BOOL", np.bool_),
    "apply_chat_template": ("apply_chat_template", "BOOL", np.bool_),
}

_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


@dataclass
class GenerationParams:
    """What to generate.  ``None`` (or an empty list) means "not sent: the server's default"."""

    max_tokens: int = 128
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    min_tokens: Optional[int] = None
    stop: Optional[List[str]] = None
    bad_words: Optional[List[str]] = None
    end_id: Optional[int] = None
    exclude_input_in_output: Optional[bool] = None
    apply_chat_template: Optional[bool] = None
    pad_id: Optional[int] = None

    def replace(self, **changes: Any) -> "GenerationParams":
        """A copy with some fields changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"unknown GenerationParams field(s): {sorted(unknown)}")
        values.update(changes)
        return GenerationParams(**values)

    def set_fields(self) -> Dict[str, Any]:
        """The fields that will be sent, normalised (lists of str, Python scalars), by field name."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            _, dtype, _ = TENSOR_SPECS[f.name]
            if dtype == "BYTES":
                words = [value] if isinstance(value, (str, bytes)) else list(value)
                words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in words]
                if not words:
                    continue
                out[f.name] = words
            elif dtype == "BOOL":
                out[f.name] = bool(value)
            elif dtype == "FP32":
                if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                    raise InvalidRequest(f"{f.name} must be a number, got {value!r}")
                out[f.name] = float(value)
            else:  # INT32, UINT64
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise InvalidRequest(f"{f.name} must be an integer, got {value!r}")
                value = int(value)
                if dtype == "UINT64" and not 0 <= value < 2 ** 64:
                    raise InvalidRequest(f"{f.name} must be in [0, 2**64), got {value}")
                if dtype == "INT32" and not _INT32_MIN <= value <= _INT32_MAX:
                    raise InvalidRequest(f"{f.name} must fit in INT32, got {value}")
                out[f.name] = value
        return out


def prompt_text(prompt: Prompt) -> str:
    """The ``text_input`` string: the prompt itself, or a chat (list of messages) as JSON."""
    if isinstance(prompt, bytes):
        return prompt.decode("utf-8")
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRequest("a chat prompt must be a list of {'role': ..., 'content': ...} dicts")
    return json.dumps(messages, ensure_ascii=False)


def build_arrays(prompt: Prompt, params: Optional[GenerationParams] = None,
                 stream: bool = False) -> Dict[str, np.ndarray]:
    """The input tensors as numpy arrays, batch dimension included: scalars are ``[1, 1]``,
    ``stop_words``/``bad_words`` are ``[1, n]``.  ``stream`` is always sent (explicitly)."""
    params = params or GenerationParams()
    arrays: Dict[str, np.ndarray] = {
        "text_input": np.array([[prompt_text(prompt).encode("utf-8")]], dtype=np.object_),
        "stream": np.array([[bool(stream)]], dtype=np.bool_),
    }
    for name, value in params.set_fields().items():
        tensor, dtype, np_dtype = TENSOR_SPECS[name]
        if dtype == "BYTES":
            arrays[tensor] = np.array([[w.encode("utf-8") for w in value]], dtype=np.object_)
        else:
            arrays[tensor] = np.array([[value]], dtype=np_dtype)
    return arrays


_TRITON_DTYPE = {"text_input": "BYTES", "stream": "BOOL"}
_TRITON_DTYPE.update({spec[0]: spec[1] for spec in TENSOR_SPECS.values()})


def build_grpc_inputs(prompt: Prompt, params: Optional[GenerationParams] = None, stream: bool = False,
                      module: Any = None) -> list:
    """``InferInput`` objects (of ``tritonclient.grpc`` by default; pass ``tritonclient.http``
    for the other flavour) holding :func:`build_arrays`."""
    if module is None:
        import tritonclient.grpc as module  # noqa: N813
    inputs = []
    for name, array in build_arrays(prompt, params, stream).items():
        inp = module.InferInput(name, list(array.shape), _TRITON_DTYPE[name])
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def build_json_body(prompt: Prompt, params: Optional[GenerationParams] = None,
                    stream: bool = False) -> Dict[str, Any]:
    """The body of ``POST /v2/models/{model}/generate[_stream]``: the same names as the tensors,
    scalars as JSON scalars, stop/bad words as JSON arrays (Triton shapes them ``[1, 1]``/``[1, n]``)."""
    params = params or GenerationParams()
    body: Dict[str, Any] = {"text_input": prompt_text(prompt), "stream": bool(stream)}
    for name, value in params.set_fields().items():
        body[TENSOR_SPECS[name][0]] = value
    return body

"""Small helpers shared by the Python-backend models: inputs, outputs, errors, config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from .allocator import keep_freed_memory
from .manifest import verify_model_dir
from .batching.sampling import InvalidParameter

_FAULT_FILE = None


def model_setup(args: dict) -> tuple[dict, dict, Path]:
    """(model config, string parameters, version folder); verifies the manifest first, and sets
    this stub process's malloc to keep freed memory (see allocator.py). With TRITONCHAT_FAULTHANDLER
    set to a file, a crashing stub appends its threads' Python stacks there."""
    fault_file = os.environ.get("TRITONCHAT_FAULTHANDLER")
    if fault_file:
        import faulthandler

        global _FAULT_FILE
        _FAULT_FILE = open(fault_file, "a")  # kept open for the life of the process
        faulthandler.enable(_FAULT_FILE, all_threads=True)
    keep_freed_memory()
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    model_dir = Path(args["model_repository"])
    verify_model_dir(model_dir, str(args["model_version"]))
    return config, params, model_dir / str(args["model_version"])


def _config(model_dir: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((Path(model_dir) / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def config_params(model_dir: Path) -> dict:
    """Another model's string parameters, from its config.pbtxt: the entry with `generate: entry` runs
    the generator's engine with the generator's own settings."""
    return {k: v.string_value for k, v in _config(model_dir).parameters.items()}


def config_inputs(model_dir: Path) -> set[str]:
    """The names of another model's inputs, from its config.pbtxt."""
    return {i.name for i in _config(model_dir).input}


def inputs(request) -> dict:
    """A request's input tensors by name, read once: `pb_utils.get_input_tensor_by_name` builds the
    list of every input tensor again for each name it looks up (the generator reads ~14 names per
    request, under the GIL its decode loop needs)."""
    return {t.name(): t for t in request.inputs()}


def optional(inputs: dict, name: str):
    t = inputs.get(name)
    return None if t is None else t.as_numpy()


def scalar(inputs: dict, name: str, cast, default=None, required: bool = False):
    arr = optional(inputs, name)
    if arr is None or arr.size == 0:
        if required:
            raise InvalidParameter(f"input '{name}' is required")
        return default
    if arr.size != 1:
        raise InvalidParameter(f"input '{name}' must hold one value, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode("utf-8")
    return cast(v)


def strings(inputs: dict, name: str) -> list[str]:
    arr = optional(inputs, name)
    if arr is None:
        return []
    out = []
    for v in arr.reshape(-1):
        try:
            s = v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)
        except UnicodeDecodeError as exc:
            raise InvalidParameter(f"input '{name}' is not valid UTF-8: {exc}") from None
        if s:
            out.append(s)
    return out


def check_batch_of_one(inputs: dict, name: str) -> np.ndarray:
    arr = optional(inputs, name)
    if arr is None:
        raise InvalidParameter(f"input '{name}' is required")
    if arr.shape[0] != 1:
        raise InvalidParameter(f"send one prompt per request: '{name}' has batch size {arr.shape[0]}")
    return arr


def tensor(name: str, value, dtype) -> "pb_utils.Tensor":
    arr = np.asarray(value, dtype=dtype)
    return pb_utils.Tensor(name, arr.reshape(1, -1) if arr.ndim <= 1 else arr)


def bytes_tensor(name: str, text: str) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([[text.encode("utf-8")]], dtype=np.object_))


def error_response(message: str, code=None) -> "pb_utils.InferenceResponse":
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def load_fast_tokenizer(version_dir: Path):
    """The raw `tokenizers.Tokenizer` (fast decode; no transformers import needed)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(version_dir / "tokenizer" / "tokenizer.json"))

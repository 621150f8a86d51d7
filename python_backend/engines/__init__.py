"""The engines a generator can run: one interface (`base.Engine`), three implementations.

`create_engine` lives here, not in `base`, so that `base` imports no implementation and every
implementation imports `base` alone (no import circle).
"""

from __future__ import annotations

from .base import Ban, Engine

KINDS = ("onnxruntime", "torch", "tensorrt")
# the build's precisions the torch engine runs, and its weight formats for them
TORCH_WEIGHTS = {"fp8": "fp8", "int8-weight-only": "int8"}


def create_engine(kind: str, **kwargs) -> Engine:
    """Build the engine a generated repository names in its `engine` parameter."""
    if kind == "onnxruntime":
        from .ort import OrtEngine

        return OrtEngine(**kwargs)
    if kind == "torch":
        from .torch import TorchEngine

        return TorchEngine(**kwargs)
    if kind == "tensorrt":
        from .trt import TrtEngine

        return TrtEngine(**kwargs)
    raise ValueError(f"unknown engine {kind!r} (expected {', '.join(KINDS)})")


def engine_options(params: dict) -> dict:
    """Optional engine knobs a repository's generator config may set as parameters (absent: the
    engine's defaults)."""
    opts = {k: params[k] for k in ("kernels", "attention") if params.get(k)}
    for flag in ("cuda_graphs", "prefill_graphs"):
        if params.get(flag):
            opts[flag] = parse_flag(params[flag])
    if params.get("mix_tokens"):
        opts["mix_tokens"] = int(params["mix_tokens"])
    if params.get("engine") == "torch" and params.get("precision") in TORCH_WEIGHTS:
        opts["weights"] = TORCH_WEIGHTS[params["precision"]]  # a build with --precision fp8 / int8-weight-only
    return opts


def parse_flag(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


__all__ = ["Ban", "Engine", "KINDS", "create_engine", "engine_options", "parse_flag"]

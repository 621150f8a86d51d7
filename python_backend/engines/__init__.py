"""The engines a generator can run: one interface (`base.Engine`), three implementations.

`create_engine` lives here, not in `base`, so that `base` imports no implementation and every
implementation imports `base` alone (no import circle).
"""

from __future__ import annotations

from .base import Ban, Engine

KINDS = ("onnxruntime", "torch", "tensorrt")


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


__all__ = ["Ban", "Engine", "KINDS", "create_engine"]

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
        return open_ort_engine(**kwargs)
    if kind == "torch":
        from .torch import TorchEngine

        return TorchEngine(**kwargs)
    if kind == "tensorrt":
        from .trt import TrtEngine

        return TrtEngine(**kwargs)
    raise ValueError(f"unknown engine {kind!r} (expected {', '.join(KINDS)})")


def open_ort_engine(model_path, max_slots: int, max_seq_len: int, threads: int = 0, **kwargs) -> Engine:
    """The ONNX Runtime engine for the graph at `model_path`: its kv_spec.json's `kv_layout` says which
    graph it is (build/ort_graph.py's fused graph: ort_gqa.py; the TorchScript export: ort.py)."""
    import json
    from pathlib import Path

    spec = json.loads((Path(model_path).parent / "kv_spec.json").read_text())
    if spec.get("kv_layout") == "gqa":
        from .ort_gqa import OrtGqaEngine

        return OrtGqaEngine(model_path, max_slots, max_seq_len, threads=threads, **kwargs)
    from .ort import OrtEngine

    return OrtEngine(model_path, max_slots, max_seq_len, threads=threads, **kwargs)


def engine_options(params: dict) -> dict:
    """Optional engine knobs a repository's generator config may set as parameters (absent: the
    engine's defaults)."""
    opts = {k: params[k] for k in ("kernels", "attention") if params.get(k)}
    for flag in ("cuda_graphs", "prefill_graphs"):
        if params.get(flag):
            opts[flag] = parse_flag(params[flag])
    if params.get("pdl") and params["pdl"] != "auto":
        opts["pdl"] = parse_flag(params["pdl"])
    if params.get("dense_kernel") == "false":
        opts["dense_kernel"] = False  # models.generator.dense_kernel: false, cuBLAS for every product
    if params.get("mix_tokens"):
        opts["mix_tokens"] = int(params["mix_tokens"])
    if params.get("engine") == "torch" and params.get("precision") in TORCH_WEIGHTS:
        opts["weights"] = TORCH_WEIGHTS[params["precision"]]  # a build with --precision fp8 / int8-weight-only
        if params.get("w8a8") == "false":
            opts["w8a8_rows"] = None  # models.generator.w8a8: false, every FP8 product W8A16
    return opts


def parse_flag(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


__all__ = ["Ban", "Engine", "KINDS", "create_engine", "engine_options", "parse_flag"]

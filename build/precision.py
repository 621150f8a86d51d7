"""The precision names of the generator graph, and reading a graph's precision back from the graph.

Writing each precision: quantize.py (dispatch, fp16), int8.py (static INT8), int8_weight_only.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

PRECISIONS = ("fp32", "fp16", "int8", "int8-weight-only", "fp8")  # fp8: the torch engine's weights

ProgressFn = Callable[[str], None]


class QuantizationError(RuntimeError):
    """A precision variant cannot be written (missing input, or the written graph fails its check)."""


def normalize_precision(precision: str) -> str:
    p = str(precision).lower().replace("_", "-")
    aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "int8-static": "int8",
               "int8wo": "int8-weight-only", "int8-weightonly": "int8-weight-only"}
    p = aliases.get(p, p)
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    return p


def graph_precision(onnx_path: Path) -> str:
    """The precision a graph was written in, read from the graph: 'int8-weight-only' (ONNX Runtime's
    weight-only ops), 'int8' (Q/DQ), 'fp16' (FP16 KV inputs) or 'fp32'."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if {"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear"} & ops:
        return "int8-weight-only"
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops:
        return "int8"
    past = next((i for i in model.graph.input if i.name.startswith("past_key_values.")), None)
    if past is not None and past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"

"""Precision `int8-weight-only`: INT8 weights and no calibration (ONNX Runtime only; TensorRT does not
parse MatMulNBits). Why MatMulNBits rather than quantize_dynamic, with measurements: docs/quantization.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .onnx_files import save_onnx


def quantize_int8_weight_only(onnx_in: Path, onnx_out: Path, *, work_dir: Path, method: str = "nbits",
                              block_size: int = 32, accuracy_level: int = 4) -> None:
    """INT8 weights, no calibration.

    `nbits` (default): MatMulNBits, 8-bit symmetric weights with one scale per block of
    `block_size` along K. accuracy_level 4 lets ONNX Runtime's CPU kernel quantize the activations
    per block on the fly and multiply in INT8 (fast, and a row's result does not depend on the other
    rows of the batch); accuracy_level 1 dequantizes to FP32 instead (much slower: docs/quantization.md).
    `dynamic`: quantize_dynamic, per-channel INT8 MatMul weights with each activation tensor
    quantized per call with one scale (so a sequence's logits depend on the batch it runs in)."""
    import onnx

    if method == "nbits":
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                      MatMulNBitsQuantizer)

        model = onnx.load(str(onnx_in), load_external_data=True)
        cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                           quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                           bits=8)
        q = MatMulNBitsQuantizer(model, algo_config=cfg)
        q.process()
        quantize_embedding(q.model.model, block_size)
        save_onnx(q.model.model, onnx_out)
    elif method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = work_dir / "fp32" / "model.onnx"
        src.parent.mkdir(exist_ok=True)
        save_onnx(onnx.load(str(onnx_in), load_external_data=True), src, threshold_bytes=0)
        out = work_dir / "dyn" / "model.onnx"
        out.parent.mkdir()
        quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        save_onnx(onnx.load(str(out), load_external_data=True), onnx_out)
    else:
        raise ValueError(method)


def symmetric_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INT8 values and scales of `blocks` [..., block]: symmetric, one scale per block (max |w| -> 127),
    as llama.cpp's q8_0 and MatMulNBits' 8-bit weights."""
    scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / 127.0
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_embedding(model, block_size: int = 32) -> int:
    """INT8 embedding tables, in place: each Gather of a 2-D float initializer (the token embedding)
    becomes a Gather of INT8 rows and one of their scales (symmetric, one scale per `block_size`
    values of a row, as llama.cpp's q8_0; per row where the width is not a multiple), multiplied
    back in float. ONNX Runtime's own GatherBlockQuantized writer takes 4 bits only. Returns how
    many tables were quantized. A lookup reads one row, so this is for the artifact's size (the
    embedding is a third of a small model's weights), not for speed."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    done = 0
    for k, node in enumerate(list(graph.node)):
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if t is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or t.dims[0] < 256:
            continue
        w = numpy_helper.to_array(t)
        rows, width = w.shape
        block = block_size if width % block_size == 0 else width
        q, scale = symmetric_blocks(w.reshape(rows, width // block, block))
        q = q.reshape(rows, width)
        name, out, p = t.name, node.output[0], node.name or f"embedding_{k}"
        graph.initializer.remove(t)
        graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                  numpy_helper.from_array(scale, f"{name}_scales"),
                                  numpy_helper.from_array(np.array([0, 0, width // block, block], np.int64), f"{p}/blocked"),
                                  numpy_helper.from_array(np.array([0, 0, width], np.int64), f"{p}/rows"),
                                  numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last")])
        ids = node.input[1]
        new = [helper.make_node("Gather", [f"{name}_int8", ids], [f"{p}/q"], name=f"{p}/GatherInt8"),
               helper.make_node("Gather", [f"{name}_scales", ids], [f"{p}/scale"], name=f"{p}/GatherScales"),
               helper.make_node("Cast", [f"{p}/q"], [f"{p}/qf"], name=f"{p}/Cast", to=onnx.TensorProto.FLOAT),
               helper.make_node("Reshape", [f"{p}/qf", f"{p}/blocked"], [f"{p}/qb"], name=f"{p}/Blocks"),
               helper.make_node("Unsqueeze", [f"{p}/scale", f"{p}/last"], [f"{p}/s4"], name=f"{p}/ScaleAxis"),
               helper.make_node("Mul", [f"{p}/qb", f"{p}/s4"], [f"{p}/deq"], name=f"{p}/Dequantize"),
               helper.make_node("Reshape", [f"{p}/deq", f"{p}/rows"], [out], name=f"{p}/Rows")]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for j, n in enumerate(new):
            graph.node.insert(at + j, n)
        done += 1
    return done

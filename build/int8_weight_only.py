"""Precision `int8-weight-only`: INT8 weights and no calibration (ONNX Runtime only; TensorRT does not
parse MatMulNBits). Why MatMulNBits rather than quantize_dynamic, with measurements: docs/quantization.md."""

from __future__ import annotations

from pathlib import Path

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

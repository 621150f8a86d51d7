"""Lower-precision variants of the exported KV-cache ONNX graph.

    fp32              the exported graph, re-saved (weights in `model.onnx.data` when > 1 MB)
    fp16              FP16 weights, activations and KV cache; the overflow-prone parts stay FP32:
                      RMSNorm/LayerNorm (pow, reduce-mean, sqrt, reciprocal), softmax, and the
                      rotary-embedding angle computation (position * inv_freq, cos, sin). Inputs
                      input_ids/attention_mask/position_ids stay int64, past/present KV are FP16,
                      logits come out FP32. Converter: onnxruntime.transformers.float16.
    int8              post-training static quantization in explicit Q/DQ form (QuantFormat.QDQ, the
                      form TensorRT compiles without a calibrator): symmetric INT8 activations
                      calibrated on real text (prefill and decode inputs, with past KV), symmetric
                      INT8 weights with one scale per output channel (axis 1 of each MatMul weight).
                      Q/DQ sit on the inputs of the linear layers only (MatMul/Gemm with a constant
                      weight); attention (Q.K^T, P.V), softmax, norms and the embedding lookup stay
                      float, the KV cache FP32. Before calibration, SmoothQuant (alpha 0.5) moves
                      activation outliers into the weights wherever that lowers the simulated INT8
                      error of the layer (folded into the norm weight, or one Mul before o_proj /
                      down_proj); the float function is unchanged.
    int8-weight-only  INT8 weights and no calibration: MatMulNBits (8 bits, symmetric, blocks of 32
                      along K; accuracy_level 4: activations quantized per block on the fly by the
                      CPU kernel) -- see docs/quantization.md for why this one rather than
                      quantize_dynamic. ONNX Runtime only (TensorRT does not parse MatMulNBits).

`quantize(onnx_in, onnx_out, precision, calibration_text=..., tokenizer=..., spec=...)` writes the
new graph, its `.data` file and a copy of `kv_spec.json` (with `precision` added) beside it.

The precision names: precision.py; the INT8 writers: int8.py and int8_weight_only.py; graph files on
disk: onnx_files.py.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from .int8 import Int8Options, quantize_int8_static
from .int8_weight_only import quantize_int8_weight_only
from .onnx_files import artifact_size, move_graph, save_onnx, toposort
from .precision import ProgressFn, QuantizationError, normalize_precision
from .text import builtin_sample

# op types whose FP16 form overflows or loses too much (norm statistics, softmax, rotary angles)
FP16_OP_BLOCK_LIST = [
    "Pow", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal", "Softmax", "Cos", "Sin", "Range", "CumSum",
    "Erf", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization",
]
# whole modules kept FP32 by node name (TorchScript export names nodes after the module path):
# every norm (input_layernorm, post_attention_layernorm, norm, ln_1, ln_f, q_norm, ...) and rotary_emb
FP16_NODE_BLOCK_PATTERN = re.compile(r"(^|/)([^/]*norm[^/]*|ln_[^/]*|[^/]*rotary_emb[^/]*)/", re.IGNORECASE)


def quantize(onnx_in: Path, onnx_out: Path, precision: str, *, calibration_text: str | None = None,
             tokenizer=None, spec=None, progress: ProgressFn | None = None,
             int8_options: Int8Options | None = None) -> Path:
    """Write the `precision` variant of the KV-cache graph `onnx_in` to `onnx_out`; return `onnx_out`.

    `calibration_text` (int8 only): text to calibrate activation ranges on; None uses the
    built-in sample (`calibration_sample.txt` in this package). `tokenizer`: the model's HF
    tokenizer (int8 only). `spec`: a KVSpec, a dict like kv_spec.json, or None to read
    `kv_spec.json` beside `onnx_in`. `onnx_out` may equal `onnx_in` (the graph is rewritten).
    """
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    precision = normalize_precision(precision)
    say = progress or (lambda _msg: None)
    spec_dict = _spec_dict(spec, onnx_in)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="tritonchat-quant-") as tmp:
        tmp = Path(tmp)
        staged = tmp / "out" / onnx_out.name
        staged.parent.mkdir()
        if precision == "fp32":
            import onnx

            save_onnx(onnx.load(str(onnx_in), load_external_data=True), staged)
        elif precision == "fp16":
            say("converting to FP16 (norms, softmax and rotary angles kept in FP32)")
            convert_fp16(onnx_in, staged)
        elif precision == "int8":
            if tokenizer is None:
                raise QuantizationError("int8 calibration needs the model's tokenizer")
            text = calibration_text if calibration_text is not None else builtin_sample("calibration")
            quantize_int8_static(onnx_in, staged, text, tokenizer, spec_dict, int8_options or Int8Options(),
                                 work_dir=tmp, progress=say)
        else:
            say("quantizing MatMul weights to INT8 (weight-only)")
            quantize_int8_weight_only(onnx_in, staged, work_dir=tmp)
        _check_model(staged, precision)
        move_graph(staged, onnx_out)

    spec_out = dict(spec_dict)
    spec_out["precision"] = precision
    (onnx_out.parent / "kv_spec.json").write_text(json.dumps(spec_out, indent=2))
    say(f"wrote {onnx_out} ({artifact_size(onnx_out) / 1e6:.1f} MB)")
    return onnx_out


# ----------------------------------------------------------------------------------------------
# FP16
# ----------------------------------------------------------------------------------------------
def fp16_node_block_list(model) -> list[str]:
    return [n.name for n in model.graph.node if n.name and FP16_NODE_BLOCK_PATTERN.search(n.name)]


def convert_fp16(onnx_in: Path, onnx_out: Path) -> None:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # shape inference on the weightless graph (no 2 GB protobuf limit), then load the weights
    model = onnx.load(str(onnx_in), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    load_external_data_for_model(model, str(Path(onnx_in).parent))
    model = convert_float_to_float16(
        model,
        keep_io_types=["logits"],
        disable_shape_infer=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_OP_BLOCK_LIST)),
        node_block_list=fp16_node_block_list(model),
    )
    _drop_fp16_round_trips(model)
    toposort(model)  # the converter appends its Casts at the end; ONNX (and TensorRT's parser) want order
    save_onnx(model, onnx_out)


def _drop_fp16_round_trips(model) -> None:
    """Fix two habits of the FP16 converter. (1) Between two blocked (FP32) nodes it inserts
    Cast(fp32->fp16) then Cast(fp16->fp32): a silent rounding exactly where FP32 was asked for
    (the rotary angles, the norm statistics). Consumers of such a pair are rewired to the FP32
    tensor. (2) A node using one FP16 tensor twice gets the same Cast twice: duplicates go."""
    graph = model.graph
    nodes = list(graph.node)
    seen_outputs, unique = set(), []
    for n in nodes:
        if n.output and all(o in seen_outputs for o in n.output):
            continue  # an identical Cast inserted twice
        seen_outputs.update(n.output)
        unique.append(n)
    producer = {o: n for n in unique for o in n.output}

    def to_of(n):
        return next((a.i for a in n.attribute if a.name == "to"), None)

    import onnx

    rename = {}
    for n in unique:
        if n.op_type != "Cast" or to_of(n) != onnx.TensorProto.FLOAT or not n.name.endswith("_cast_to_fp32_node"):
            continue
        up = producer.get(n.input[0])
        if up is not None and up.op_type == "Cast" and to_of(up) == onnx.TensorProto.FLOAT16 \
                and up.name.endswith("_cast_to_fp16_node"):
            rename[n.output[0]] = up.input[0]
    if rename:
        graph_outputs = {o.name for o in graph.output}
        keep = []
        for n in unique:
            if n.output[0] in rename and n.output[0] not in graph_outputs:
                continue
            for i, name in enumerate(n.input):
                if name in rename:
                    n.input[i] = rename[name]
            keep.append(n)
        used = {i for n in keep for i in n.input} | graph_outputs
        keep = [n for n in keep if not (n.op_type == "Cast" and n.name.endswith("_cast_to_fp16_node")
                                        and n.output[0] not in used)]
        unique = keep
    if len(unique) != len(nodes):
        del graph.node[:]
        graph.node.extend(unique)
        live = {o for n in unique for o in n.output} | {i.name for i in graph.input}
        stale = [v for v in graph.value_info if v.name not in live]
        for v in stale:
            graph.value_info.remove(v)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _spec_dict(spec, onnx_in: Path) -> dict:
    if spec is None:
        p = Path(onnx_in).parent / "kv_spec.json"
        if not p.exists():
            raise QuantizationError(f"no spec given and no {p}")
        return json.loads(p.read_text())
    if isinstance(spec, dict):
        return dict(spec)
    if hasattr(spec, "to_json"):
        d = dict(spec.to_json())
        p = Path(onnx_in).parent / "kv_spec.json"
        if p.exists():  # keep extra keys the build wrote (they are not part of KVSpec)
            d = {**json.loads(p.read_text()), **d}
        return d
    raise TypeError(f"spec must be a KVSpec, a dict or None, not {type(spec).__name__}")


def _check_model(path: Path, precision: str) -> None:
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    ins = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    # the TorchScript export's inputs, or the fused graph's (ort_graph.py)
    names = ("input_ids", "logits_index") if "seqlens_k" in ins else ("input_ids", "attention_mask", "position_ids")
    for name in names:
        if ins.get(name) != onnx.TensorProto.INT64:
            raise QuantizationError(f"{precision} graph: input {name} is not int64")
    if outs.get("logits") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        raise QuantizationError(f"{precision} graph: no float logits output")

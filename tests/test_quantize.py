"""FP16 / INT8 / INT8 weight-only graphs of the tiny real model, run through OrtEngine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import STORIES_MODEL as MODEL

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not present")


def _greedy(model_path, prompt_ids, n=16):
    from tritonchat.python_backend.engines.ort import OrtEngine

    ex = OrtEngine(model_path, max_slots=2, max_seq_len=64, threads=1)
    tok = int(np.argmax(ex.prefill(0, np.asarray(prompt_ids))))
    out = [tok]
    for _ in range(n - 1):
        tok = int(np.argmax(ex.decode(np.array([0]), np.array([tok]))[0]))
        out.append(tok)
    return out, ex


def _prompt(tokenizer, text="Once upon a time, there was a little"):
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-weight-only"])
def test_graph_is_valid_and_generates_greedily(graphs, tokenizer, precision):
    import onnx

    path = graphs[precision]
    onnx.checker.check_model(str(path))
    spec = json.loads((path.parent / "kv_spec.json").read_text())
    assert spec["precision"] == precision and spec["num_layers"] == 5
    tokens, ex = _greedy(path, _prompt(tokenizer))
    assert len(tokens) == 16 and all(0 <= t < ex.vocab_size for t in tokens)
    ref, _ = _greedy(graphs["fp32"], _prompt(tokenizer))
    assert tokens[:3] == ref[:3]  # quantization noise may flip a late near-tie, not the first tokens
    assert ex.kv_dtype == (np.float16 if precision == "fp16" else np.float32)
    text = tokenizer.decode(tokens)
    assert text.strip()


def test_fp16_types_and_fp32_islands(graphs):
    import onnx

    model = onnx.load(str(graphs["fp16"]), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    ins = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    F, H, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64
    assert ins["input_ids"] == ins["attention_mask"] == ins["position_ids"] == I64
    assert ins["past_key_values.0.key"] == H and outs["present.4.value"] == H
    assert outs["logits"] == F
    inits = {t.name: t.data_type for t in model.graph.initializer}
    linear_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert linear_weights and all(inits[w] == H for w in linear_weights)
    # overflow-prone ops compute in FP32
    checked = 0
    for n in model.graph.node:
        if n.op_type in ("Pow", "ReduceMean", "Softmax", "Sqrt", "Cos", "Sin"):
            assert types.get(n.input[0]) == F, (n.name, n.op_type)
            checked += 1
    assert checked >= 5 * 2 * 3 + 3
    # no FP32 -> FP16 -> FP32 round trip between two FP32 islands (the converter's habit, undone)
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Cast" and n.attribute[0].i == F:
            up = producers.get(n.input[0])
            assert not (up is not None and up.op_type == "Cast" and up.attribute[0].i == H
                        and types.get(up.input[0]) == F), n.name


def test_int8_graph_is_qdq_with_per_channel_weight_scales(graphs):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graphs["int8"]), load_external_data=True)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    linear, attention = 0, 0
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        a, b = (producers.get(x) for x in n.input)
        if b is not None and b.op_type == "DequantizeLinear" and b.input[0] in inits:
            linear += 1
            w = inits[b.input[0]]
            assert w.data_type == onnx.TensorProto.INT8
            scale = numpy_helper.to_array(inits[b.input[1]])
            axis = {x.name: x.i for x in b.attribute}.get("axis")
            assert axis == 1 and scale.shape == (w.dims[1],)  # one scale per output channel
            zp = numpy_helper.to_array(inits[b.input[2]]) if len(b.input) > 2 and b.input[2] else np.zeros(1)
            assert not np.any(zp)  # symmetric
            # the activation side is quantized too (static INT8, symmetric int8 zero point)
            assert a is not None and a.op_type == "DequantizeLinear"
            q = producers[a.input[0]]
            assert q.op_type == "QuantizeLinear"
            azp = numpy_helper.to_array(inits[q.input[2]])
            assert azp.dtype == np.int8 and not np.any(azp)
        else:
            attention += 1  # Q.K^T and P.V stay float
            assert a is None or a.op_type != "DequantizeLinear"
    assert linear == 5 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert attention == 5 * 2


def test_int8_weight_only_uses_8bit_matmulnbits(graphs):
    import onnx

    model = onnx.load(str(graphs["int8-weight-only"]), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 * 7 + 1
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_batched_decode_with_holes_matches_single_sequences(graphs, tokenizer, precision):
    """Slots of different lengths in one decode step (holes in the mask) give each sequence's own logits."""
    from tritonchat.python_backend.engines.ort import OrtEngine

    path = graphs[precision]
    prompts = [_prompt(tokenizer, "The dog ran to the park and"), _prompt(tokenizer, "Tom")]
    ex = OrtEngine(path, max_slots=3, max_seq_len=64, threads=1)
    firsts = [int(np.argmax(ex.prefill(s, np.asarray(p)))) for s, p in zip((0, 2), prompts)]
    batched = ex.decode(np.array([0, 2]), np.array(firsts))
    for p, t, row in zip(prompts, firsts, batched):
        single = OrtEngine(path, max_slots=1, max_seq_len=64, threads=1)
        single.prefill(0, np.asarray(p))
        alone = single.decode(np.array([0]), np.array([t]))[0]
        np.testing.assert_allclose(row, alone, atol=2e-2 if precision == "fp16" else 1e-3)


def test_calibration_reader_feeds_prefill_and_decode(graphs, tokenizer):
    from tritonchat.build.int8 import KVCalibrationReader
    from tritonchat.build.text import builtin_sample, encode

    spec = json.loads((graphs["fp32"].parent / "kv_spec.json").read_text())
    reader = KVCalibrationReader(graphs["fp32"], encode(tokenizer, builtin_sample()), spec, window=32,
                                 max_windows=3, decode_steps=2, bos=tokenizer.bos_token_id)
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == len(reader) == 3 * 3
    pre, dec1, dec2 = feeds[:3]
    assert pre["input_ids"].shape == (1, 30) and pre["past_key_values.0.key"].shape[2] == 0
    assert dec1["input_ids"].shape == (1, 1) and dec1["past_key_values.0.key"].shape == (1, 4, 30, 8)
    assert dec2["past_key_values.3.value"].shape[2] == 31 and dec2["position_ids"][0, 0] == 31
    assert dec2["attention_mask"].shape == (1, 32)
    reader.rewind()
    assert reader.get_next()["input_ids"].shape == (1, 30)


def test_builtin_sample_parts_are_disjoint():
    from tritonchat.build.text import builtin_sample

    calib, held = builtin_sample("calibration"), builtin_sample("heldout")
    assert len(calib) > 3000 and len(held) > 1000
    assert "Fox and the Grapes" in held and "Fox and the Grapes" not in calib


def test_fp32_in_place_and_bad_precision(graphs, tmp_path):
    import shutil

    from tritonchat.build.onnx_files import artifact_size
    from tritonchat.build.quantize import quantize

    src = graphs["fp32"].parent
    work = tmp_path / "g"
    shutil.copytree(src, work)
    path = work / "model.onnx"
    before = artifact_size(path)
    assert quantize(path, path, "float32") == path  # rewritten in place, alias accepted
    assert abs(artifact_size(path) - before) < 0.05 * before
    assert json.loads((work / "kv_spec.json").read_text())["precision"] == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        quantize(path, tmp_path / "x" / "model.onnx", "int4")
    assert artifact_size(graphs["int8-weight-only"]) < 0.6 * artifact_size(graphs["fp32"])

"""The CPU engine's own graph for Llama-family models: ONNX Runtime's fused operators, KV in place.

The TorchScript export (export.py) feeds the past KV in and returns past + new as `present`: every
decode step copies each sequence's whole KV three times (the gather into a contiguous input, the
graph's Concat, the scatter of the new column), and at 16 streams of a 15M-parameter model those
copies cost more than the weights' matrix products (docs/benchmarks.md, "CPU engine, eleventh
session"). This graph is written from the weights with ONNX Runtime's contrib operators instead:

    inputs   input_ids              int64 [batch, seq]       (prompts right-padded)
             seqlens_k              int32 [batch]            each row's total length - 1
             total_sequence_length  int32 []                 the longest row's total length
             logits_index           int64 [batch, k]         positions whose logits come out
             past_key_values.{i}.key / .value   float [batch, kv_heads, max_seq_len, head_dim]
             head_rows              int64 [m]                rows of the k positions through the fp32 head
             screen_rows            int64 [n]                ... through its 8-bit copy (fp32 builds)
    outputs  logits                 float [m, k, vocab]
             present.{i}.key / .value           the same buffers (bound to the past's memory)
             hidden                 float [batch, k, hidden] the final norm's output at those positions
             screen_logits          float [n, k, vocab]      the 8-bit copy's logits (fp32 builds)

    per layer: RMSNormalization (the residual add fused: ONNX Runtime's SkipSimplifiedLayerNormalization)
               -> one q|k|v MatMul -> GroupQueryAttention (rotary inside, the new KV written into
               the cache buffer at each row's own length, attention over that row's length only)
               -> o MatMul -> norm -> one gate|up MatMul -> SiLU(gate) * up -> down MatMul

Only the positions in `logits_index` reach the LM head (a prefill asks for its last token; the
build's parity and accuracy checks for all), and of those only the rows in `head_rows`. An fp32 build's
graph also carries an 8-bit copy of the head (`head_screen`): a greedy decode step of few rows sends
its rows there instead and settles the argmax exactly from `hidden` (python_backend/engines/head_screen.py).
GroupQueryAttention on the CPU needs head_dim % 16 == 0:
a model whose heads are narrower (stories260K: 8) gets its q, k, v heads zero-padded to the next
multiple of 16 (each rotary half to the front of its padded half, the rotary table and o_proj to match,
the softmax scale kept): q.k and the attention output are the model's, its KV cache twice as wide.
It also needs a batch of 1 for a prompt on top of a past (prefix reuse: one sequence per run anyway).
`supported()` says when this graph applies; the build falls back to the TorchScript export otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .export import KVSpec
from .onnx_files import save_onnx

LAYOUT = "gqa"  # kv_spec.json's "kv_layout" for graphs written here
_ARCHS = ("llama", "mistral")


def supported(model) -> tuple[bool, str]:
    """(True, "") where this graph can express `model`; else (False, why)."""
    cfg = model.config
    if cfg.model_type not in _ARCHS:
        return False, f"architecture {cfg.model_type!r} (written for {', '.join(_ARCHS)})"
    spec = KVSpec.from_config(cfg)
    if spec.head_dim % 2:
        return False, f"odd head_dim {spec.head_dim}"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False, "linear layers with biases"
    if getattr(cfg, "sliding_window", None) and cfg.model_type == "mistral":
        return False, "sliding-window attention"
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in ("default", "llama3", "linear"):
        return False, f"rotary embedding {getattr(rotary, 'rope_type', None)!r} (position-dependent scaling)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return False, f"activation {cfg.hidden_act!r}"
    return True, ""


def _head_copy(head: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """The LM head [vocab, hidden] as MatMulNBits stores 8-bit weights: [vocab, blocks, block] uint8
    with zero point 128 (the default where the graph gives none) and one scale per block, symmetric
    (int8_weight_only.symmetric_blocks); a hidden size not a multiple of `block` is zero-padded."""
    from .int8_weight_only import symmetric_blocks

    vocab, hidden = head.shape
    padded = -(-hidden // block) * block
    w = np.zeros((vocab, padded), dtype=np.float32)
    w[:, :hidden] = head
    q, scales = symmetric_blocks(w.reshape(vocab, padded // block, block))
    return (q.astype(np.int16) + 128).astype(np.uint8), scales, block


def _rope_tables(model, positions: int, padded: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, padded / 2] as transformers computes them (inv_freq and its scaling); the
    padded dimensions (zeros in q and k) get the identity rotation."""
    import torch

    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().float().cpu()
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    cos, sin = np.ones((positions, padded // 2), np.float32), np.zeros((positions, padded // 2), np.float32)
    cos[:, :len(inv_freq)] = (torch.cos(angles) * scale).numpy()
    sin[:, :len(inv_freq)] = (torch.sin(angles) * scale).numpy()
    return cos, sin


def _head_dims(d: int, padded: int) -> np.ndarray:
    """Where each of a head's d dimensions goes in a head of `padded`: each rotary half (transformers'
    rotate_half layout) to the front of the padded half, so the rotation pairs stay pairs."""
    return np.concatenate([np.arange(d // 2), padded // 2 + np.arange(d // 2)])


def _pad_rows(w: np.ndarray, heads: int, d: int, padded: int) -> np.ndarray:
    """A q/k/v projection [heads * d, in] -> [heads * padded, in], zero rows in the padding."""
    if d == padded:
        return w
    out = np.zeros((heads, padded, w.shape[1]), w.dtype)
    out[:, _head_dims(d, padded)] = w.reshape(heads, d, -1)
    return out.reshape(heads * padded, -1)


def _pad_cols(w: np.ndarray, heads: int, d: int, padded: int) -> np.ndarray:
    """o_proj [out, heads * d] -> [out, heads * padded] (zero columns for the padded dimensions)."""
    if d == padded:
        return w
    out = np.zeros((w.shape[0], heads, padded), w.dtype)
    out[:, :, _head_dims(d, padded)] = w.reshape(w.shape[0], heads, d)
    return out.reshape(w.shape[0], -1)


def write_graph(model, out_path: Path, opset: int = 23, kv_dtype: str = "float32",
                head_screen: bool = True) -> KVSpec:
    """Write the graph for `model` (a transformers Llama/Mistral in float32) to `out_path`; return the
    shape of its KV cache (head_dim padded to a multiple of 16: what kv_spec.json must record).
    `kv_dtype` "float16": the KV cache, and so the attention (GroupQueryAttention takes q, k, v and the
    cache in one type), in float16; the projections and everything else stay float32. `head_screen`:
    add the head's 8-bit copy (module docstring; an INT8 build's head is 8-bit already)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ok, why = supported(model)
    if not ok:
        raise ValueError(f"the fused CPU graph cannot express this model: {why}")
    cfg = model.config
    spec = KVSpec.from_config(cfg)
    n_heads, kv, d = cfg.num_attention_heads, spec.num_kv_heads, spec.head_dim
    dp = -(-d // 16) * 16  # GroupQueryAttention's CPU kernel: a multiple of 16 (module docstring)
    eps = float(cfg.rms_norm_eps)
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(name: str, array: np.ndarray) -> str:
        return const(name, np.asarray(array, dtype=np.float32))

    def node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def linear(x: str, w: np.ndarray, name: str) -> str:
        """x @ w.T for a transformers Linear weight w [out, in] (MatMul: the form the INT8 quantizer takes)."""
        return node("MatMul", [x, weight(f"{name}.weight", w.T)], [f"{name}/out"], f"{name}/MatMul")[0]

    if kv_dtype not in ("float32", "float16"):
        raise ValueError(f"kv_dtype must be float32 or float16, not {kv_dtype!r}")
    half = kv_dtype == "float16"
    kv_type = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    cos, sin = _rope_tables(model, spec.max_position_embeddings, dp)
    const("cos_cache", cos.astype(np.float16 if half else np.float32))
    const("sin_cache", sin.astype(np.float16 if half else np.float32))
    embed = sd["model.embed_tokens.weight"]
    hidden = node("Gather", [weight("model.embed_tokens.weight", embed), "input_ids"], ["embed/out"], "embed/Gather")[0]
    x = node("RMSNormalization", [hidden, weight("model.layers.0.input_layernorm.weight",
             sd["model.layers.0.input_layernorm.weight"])], ["layers.0/norm_in/out"], "layers.0/norm_in",
             axis=-1, epsilon=eps)[0]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        qkv = np.concatenate([_pad_rows(sd[f"{p}.self_attn.{k}_proj.weight"], h, d, dp)
                              for k, h in (("q", n_heads), ("k", kv), ("v", kv))], axis=0)
        packed = linear(x, qkv, f"{p}.self_attn.qkv_proj")
        if half:
            packed = node("Cast", [packed], [f"layers.{i}/qkv16"], f"layers.{i}/qkv/Cast", to=kv_type)[0]
        attn = node("GroupQueryAttention",
                    [packed, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                     "total_sequence_length", "cos_cache", "sin_cache"],
                    [f"layers.{i}/attn/out", f"present.{i}.key", f"present.{i}.value"], f"layers.{i}/attn",
                    domain="com.microsoft", num_heads=n_heads, kv_num_heads=kv, do_rotary=1,
                    rotary_interleaved=0, scale=float(d) ** -0.5)[0]
        if half:
            attn = node("Cast", [attn], [f"layers.{i}/attn32"], f"layers.{i}/attn/Cast", to=TensorProto.FLOAT)[0]
        o = linear(attn, _pad_cols(sd[f"{p}.self_attn.o_proj.weight"], n_heads, d, dp), f"{p}.self_attn.o_proj")
        # residual add + norm in one op; output 3 is the sum (the residual stream)
        x, _, _, hidden = node("SkipSimplifiedLayerNormalization",
                               [o, hidden, weight(f"{p}.post_attention_layernorm.weight",
                                                  sd[f"{p}.post_attention_layernorm.weight"])],
                               [f"layers.{i}/norm_post/out", "", "", f"layers.{i}/residual_attn"],
                               f"layers.{i}/norm_post", domain="com.microsoft", epsilon=eps)
        gate_up = np.concatenate([sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.up_proj.weight"]], axis=0)
        gu = linear(x, gate_up, f"{p}.mlp.gate_up_proj")
        sizes = const(f"layers.{i}/split_sizes", np.array([cfg.intermediate_size] * 2, np.int64))
        gate, up = node("Split", [gu, sizes], [f"layers.{i}/gate", f"layers.{i}/up"], f"layers.{i}/Split", axis=-1)
        sig = node("Sigmoid", [gate], [f"layers.{i}/sigmoid"], f"layers.{i}/Sigmoid")[0]
        silu = node("Mul", [gate, sig], [f"layers.{i}/silu"], f"layers.{i}/SiLU")[0]
        act = node("Mul", [silu, up], [f"layers.{i}/act"], f"layers.{i}/GateUp")[0]
        down = linear(act, sd[f"{p}.mlp.down_proj.weight"], f"{p}.mlp.down_proj")
        last = i == spec.num_layers - 1
        norm_w = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        x, _, _, hidden = node("SkipSimplifiedLayerNormalization", [down, hidden, weight(norm_w, sd[norm_w])],
                               ["final_norm/out" if last else f"layers.{i + 1}/norm_in/out", "", "",
                                f"layers.{i}/residual_mlp"], f"layers.{i}/norm_next", domain="com.microsoft",
                               epsilon=eps)
    # only the asked positions reach the LM head: [b, s, D] -> [b, k, D]
    idx = node("Unsqueeze", ["logits_index", const("unsqueeze_axes", np.array([-1], np.int64))],
               ["logits_index/3d"], "logits_index/Unsqueeze")[0]
    picked = node("GatherND", [x, idx], ["hidden"], "logits_index/GatherND", batch_dims=1)[0]
    head = sd.get("lm_head.weight", embed)  # tied models: a transposed copy (MatMul's form)
    rows = node("Gather", [picked, "head_rows"], ["lm_head/rows"], "head_rows/Gather", axis=0)[0]
    node("MatMul", [rows, weight("lm_head.weight", head.T)], ["logits"], "lm_head/MatMul")
    if head_screen:
        q8, scales, block = _head_copy(head)
        rows = node("Gather", [picked, "screen_rows"], ["lm_head_screen/rows"], "screen_rows/Gather", axis=0)[0]
        node("MatMulNBits", [rows, const("lm_head.screen_q8", q8), const("lm_head.screen_scales", scales)],
             ["screen_logits"], "lm_head_screen/MatMulNBits", domain="com.microsoft", K=head.shape[1],
             N=head.shape[0], bits=8, block_size=block, accuracy_level=4)

    past_shape = ["batch", kv, "max_seq", dp]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch", "k"]),
              helper.make_tensor_value_info("head_rows", TensorProto.INT64, ["m"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", "k", spec.vocab_size])]
    for name in spec.past_names():
        inputs.append(helper.make_tensor_value_info(name, kv_type, past_shape))
    for name in spec.present_names():
        outputs.append(helper.make_tensor_value_info(name, kv_type, past_shape))
    outputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "k", cfg.hidden_size]))
    if head_screen:
        inputs.append(helper.make_tensor_value_info("screen_rows", TensorProto.INT64, ["n"]))
        outputs.append(helper.make_tensor_value_info("screen_logits", TensorProto.FLOAT, ["n", "k", spec.vocab_size]))
    graph = helper.make_graph(nodes, "tritonchat_gqa", inputs, outputs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                         helper.make_opsetid("com.microsoft", 1)])
    onnx_model.ir_version = 10  # what ONNX Runtime 1.2x reads
    onnx.checker.check_model(onnx_model, full_check=False)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(onnx_model, out_path)
    return dataclasses.replace(spec, head_dim=dp)

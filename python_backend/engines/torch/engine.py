"""PyTorch engine: a compact Llama-family forward over a static slot KV cache, with CUDA graphs.

KV storage is one tensor per layer and K/V, shaped [max_slots + 1, kv_heads, max_seq_len, head_dim]
(the extra last slot is the target of padded batch rows); a sequence of length L occupies positions
[0, L) of its slot, as in `engine_ort`. Nothing is ever re-packed: prefill writes [slot, :, :n], a
decode step writes each new K/V column at [slot, :, L] and attends over [0, L] of that slot.

Native path (model_type llama / mistral / qwen2 / qwen3, SiLU MLP, no sliding window shorter than
`max_seq_len`): the forward is written here (RMSNorm, RoPE from the HF rotary module so every
`rope_parameters` type HF knows is honoured, GQA attention, SwiGLU MLP, optional q/k/v/o biases,
Qwen3's q/k norms, tied embeddings), reading the weights of the loaded HF model; q/k/v and
gate/up projections are fused into one matrix each. Two sets of kernels implement the small ops:
  * "triton" (CUDA default when Triton imports): fused add+RMSNorm, RoPE + KV-cache write,
    SiLU*up, a split-K decode attention that reads the cache in place through the slot indices
    and per-slot lengths (flash-decoding style; no gather, no host sync; a combine kernel unless
    the batch fills the GPU with one split), and a varlen causal prefill attention over packed
    prompts (one program per block of queries, from a table of blocks).
  * "torch" (CPU, or anywhere as the reference): plain PyTorch ops; decode attention gathers the
    batch's slots up to a length bucket and runs masked `scaled_dot_product_attention`.
Prefill runs every admitted prompt in one forward (packed tokens; attention varlen with the Triton
attention, else causal SDPA per prompt over the right-padded batch); on CUDA that forward is padded
to a bucket and replayed as a CUDA graph (padding tokens write into the dummy slot). With the Triton
attention the bucket is the token count alone, so `warmup()` captures them all.

CUDA graphs: the decode step is captured lazily, on the first use of each padded batch size (sizes
1, 2, 4, ... up to `max_slots`, or `graph_batch_sizes`); with the "torch"/SDPA attention a graph is
captured per (batch size, length bucket of `length_bucket` positions). `warmup()` captures all batch
sizes up front. A batch larger than the largest captured size runs eagerly.

Other architectures (gpt2, ...): a slow fallback runs the transformers model itself with one
`DynamicCache` per slot, one sequence at a time (correct, not fast; `describe()["path"]` says which).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..base import Engine

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_NATIVE_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BAN_IDS = 8  # end ids a decode step can ban per row inside its graph (more: banned outside it)
_IN_ROWS = 4 + BAN_IDS
_RING = 4  # decode steps whose ids can be in flight at once
PREFILL_TOKEN_STEP = 256  # prefill graph buckets: tokens in multiples of this above it
PREFILL_BLOCK = 64  # queries per program of the varlen prefill attention
MIX_PROMPTS = 8  # prompts a decode step can carry (`decode_greedy_begin(prompts=...)`)
# decode attention splits no sequence while the cache holds at most this many positions: a split
# costs a combine kernel and idle programs, ~2 us a layer at 1-16 rows (H100, benchmarks/gpu_attn.py)
SPLIT_MIN_POSITIONS = 512


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (expected bfloat16, float16 or float32)") from None


def _no_cudnn_sdpa():
    """SDPA without the cuDNN backend (flash, memory-efficient or math instead). On the H100 torch
    picks cuDNN attention, which builds a plan for every new shape: ~70 ms on the first prefill of
    each (prompts, width) shape, which every running stream then waits for; flash: ~0.1 ms."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: its default backends
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ------------------------------------------------------------------------------------------------
# Triton kernels (defined only where Triton imports; on CPU they run under TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------
_TRITON = None


def _triton_kernels():
    """Return a namespace of the Triton kernels, or None where Triton is unusable."""
    global _TRITON, _attend_block  # a @triton.jit helper is found through the module's globals
    if _TRITON is not None:
        return _TRITON or None
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton: the torch ops take over
        _TRITON = False
        return None

    @triton.jit
    def add_rmsnorm_kernel(X, R, W, Y, stride_x, stride_r, stride_y, N, eps,
                           HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        # R <- R + X (the residual stream, in place); Y <- rmsnorm(R) * W, rounded like HF's
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
            tl.store(R + row * stride_r + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        y = (xf * (1.0 / tl.sqrt(var + eps))).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=m, other=0.0)
        y = (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=m)

    @triton.jit
    def rope_kv_kernel(QKV, Cos, Sin, Slots, Pos, Q, KC, VC,
                       stride_qkv, stride_cos, stride_cs, stride_ch, stride_ct,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
        # one program per (row, head): rotate q heads into Q [rows, HQ, D]; rotate k heads and copy
        # v heads into the cache at [slot, head, pos]
        row = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(Pos + row)
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, DP)
        m = d < D
        rd = tl.where(d < HALF, d + HALF, d - HALF)
        c = tl.load(Cos + pos * stride_cos + d, mask=m, other=0.0).to(tl.float32)
        s = tl.load(Sin + pos * stride_cos + d, mask=m, other=0.0).to(tl.float32)
        base = QKV + row * stride_qkv + h * D
        x = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(base + rd, mask=m, other=0.0).to(tl.float32)
        xr = tl.where(d < HALF, -xr, xr)
        dt = Q.dtype.element_ty
        y = ((x * c).to(dt).to(tl.float32) + (xr * s).to(dt).to(tl.float32)).to(dt)
        if h < HQ:
            tl.store(Q + (row * HQ + h) * D + d, y, mask=m)
        else:
            kvh = h - HQ
            slot = tl.load(Slots + row)
            off = slot * stride_cs + kvh * stride_ch + pos * stride_ct + d
            tl.store(KC + off, y, mask=m)
            v = tl.load(QKV + row * stride_qkv + (HQ + HKV + kvh) * D + d, mask=m, other=0.0)
            tl.store(VC + off, v, mask=m)

    @triton.jit
    def silu_mul_kernel(GU, O, stride_gu, stride_o, I, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < I
        g = tl.load(GU + row * stride_gu + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + I + c, mask=m, other=0.0).to(tl.float32)
        dt = O.dtype.element_ty
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(O + row * stride_o + c, (a * u).to(dt), mask=m)

    @triton.jit
    def _attend_block(q, kb, vb, t, tm, d, dm, stride_ct, qk_scale, ok, m_i, l_i, acc, IEEE: tl.constexpr):
        # one block of keys/values at positions t (tm: in range) for the queries q, where `ok`
        # (broadcast to [queries, keys]) allows: online softmax in base 2; returns (max, sum, acc)
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(kb + t[:, None] * stride_ct + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + t[:, None] * stride_ct + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def attn_split_kernel(Q, KC, VC, Slots, Lens, Acc, Mx, Lx, O, Cos, Sin,
                          stride_q, stride_cos, stride_cs, stride_ch, stride_ct, qk_scale,
                          HQ: tl.constexpr, HKV: tl.constexpr, NS: tl.constexpr, CHUNK: tl.constexpr,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          BLOCK_N: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr):
        # program (b, kv head, split): the G query heads of one kv head against positions
        # [split * CHUNK, min((split + 1) * CHUNK, len + 1)) of slot Slots[b]; online softmax in
        # base 2, unnormalised partial output and its (max, sum) go to Acc / Mx / Lx; with one
        # split (NS == 1) the normalised output goes straight to O [b, HQ * D], no combine.
        # ROPE: Q holds the step's q/k/v rows (row stride stride_q), not yet rotated: the program
        # rotates its q heads at position len, and the one whose split holds that position also
        # rotates the new key and writes it and the new value into the cache before reading it
        # (what rope_kv_kernel did, one launch per layer less); else Q is [b, HQ, D], rotated.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        slot = tl.load(Slots + b)
        pos = tl.load(Lens + b).to(tl.int32)
        n = pos + 1
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, n)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        gm = g < G
        dm = d < D
        heads = kvh * G + g
        qm = gm[:, None] & dm[None, :]
        if ROPE:
            HALF: tl.constexpr = D // 2
            rd = tl.where(d < HALF, d + HALF, d - HALF)
            sign = tl.where(d < HALF, -1.0, 1.0)
            c = tl.load(Cos + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
            sn = tl.load(Sin + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
            row = Q + b * stride_q
            dt = KC.dtype.element_ty
            x = tl.load(row + heads[:, None] * D + d[None, :], mask=qm, other=0.0).to(tl.float32)
            xr = tl.load(row + heads[:, None] * D + rd[None, :], mask=qm, other=0.0).to(tl.float32) * sign[None, :]
            q = ((x * c[None, :]).to(dt).to(tl.float32) + (xr * sn[None, :]).to(dt).to(tl.float32)).to(dt)
            if (start <= pos) & (pos < end):
                kx = tl.load(row + (HQ + kvh) * D + d, mask=dm, other=0.0).to(tl.float32)
                kr = tl.load(row + (HQ + kvh) * D + rd, mask=dm, other=0.0).to(tl.float32) * sign
                k = ((kx * c).to(dt).to(tl.float32) + (kr * sn).to(dt).to(tl.float32)).to(dt)
                v = tl.load(row + (HQ + HKV + kvh) * D + d, mask=dm, other=0.0)
                off = slot * stride_cs + kvh * stride_ch + pos * stride_ct + d
                tl.store(KC + off, k, mask=dm)
                tl.store(VC + off, v, mask=dm)
            tl.debug_barrier()  # the block's stores are seen by its loads below
        else:
            q = tl.load(Q + (b * HQ + heads)[:, None] * D + d[None, :], mask=qm, other=0.0)
        kb = KC + slot * stride_cs + kvh * stride_ch
        vb = VC + slot * stride_cs + kvh * stride_ch
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for s0 in range(start, end, BLOCK_N):
            t = s0 + tl.arange(0, BLOCK_N)
            tm = t < end
            m_i, l_i, acc = _attend_block(q, kb, vb, t, tm, d, dm, stride_ct, qk_scale, tm[None, :],
                                          m_i, l_i, acc, IEEE)
        if NS == 1:
            out = acc / l_i[:, None]  # l_i >= 1: every row sees position 0
            tl.store(O + (b * HQ + heads)[:, None] * D + d[None, :], out.to(O.dtype.element_ty),
                     mask=gm[:, None] & dm[None, :])
        else:
            o = (b * HQ + heads) * NS + sp
            tl.store(Acc + o[:, None] * DP + d[None, :], acc, mask=gm[:, None])
            tl.store(Mx + o, m_i, mask=gm)
            tl.store(Lx + o, l_i, mask=gm)

    @triton.jit
    def attn_combine_kernel(Acc, Mx, Lx, O, HQ: tl.constexpr, NS: tl.constexpr,
                            D: tl.constexpr, DP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, NS)
        d = tl.arange(0, DP)
        base = (b * HQ + h) * NS
        m = tl.load(Mx + base + s)
        l = tl.load(Lx + base + s)
        mx = tl.max(m, 0)  # split 0 always holds position 0: finite
        w = tl.exp2(m - mx)  # empty splits: exp2(-inf) = 0
        acc = tl.load(Acc + (base + s)[:, None] * DP + d[None, :])
        out = tl.sum(acc * w[:, None], 0) / tl.sum(w * l, 0)
        tl.store(O + (b * HQ + h) * D + d, out.to(O.dtype.element_ty), mask=d < D)

    @triton.jit
    def prefill_attn_kernel(Q, KC, VC, Table, O, stride_q, stride_cs, stride_ch, stride_ct, qk_scale,
                            HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        # program (query block, q head) of packed prompts (varlen, causal). Table row of the block:
        # packed row of its first query, the prompt's slot, that query's position, queries in the
        # block (0: a padding program, which does nothing). Keys: the prompt's own positions
        # 0 .. last query, read from the cache (written by rope_kv just before).
        blk = tl.program_id(0)
        h = tl.program_id(1)
        row0 = tl.load(Table + blk * 4)
        slot = tl.load(Table + blk * 4 + 1)
        p0 = tl.load(Table + blk * 4 + 2).to(tl.int32)
        nq = tl.load(Table + blk * 4 + 3).to(tl.int32)
        if nq > 0:
            m = tl.arange(0, BLOCK_M)
            d = tl.arange(0, DP)
            qm = m < nq
            dm = d < D
            rows = row0 + m
            q = tl.load(Q + rows[:, None] * stride_q + h * D + d[None, :], mask=qm[:, None] & dm[None, :], other=0.0)
            kvh = h // G
            kb = KC + slot * stride_cs + kvh * stride_ch
            vb = VC + slot * stride_cs + kvh * stride_ch
            qpos = p0 + m
            end = p0 + nq
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, DP], tl.float32)
            for s0 in range(0, end, BLOCK_N):
                t = s0 + tl.arange(0, BLOCK_N)
                tm = t < end
                ok = tm[None, :] & (t[None, :] <= qpos[:, None])  # causal
                m_i, l_i, acc = _attend_block(q, kb, vb, t, tm, d, dm, stride_ct, qk_scale, ok,
                                              m_i, l_i, acc, IEEE)
            out = acc / l_i[:, None]  # padding rows (m >= nq) see key 0: finite, not stored
            tl.store(O + rows[:, None] * (HQ * D) + h * D + d[None, :], out.to(O.dtype.element_ty),
                     mask=qm[:, None] & dm[None, :])

    class _NS:
        pass

    ns = _NS()
    ns.add_rmsnorm = add_rmsnorm_kernel
    ns.rope_kv = rope_kv_kernel
    ns.silu_mul = silu_mul_kernel
    ns.attn_split = attn_split_kernel
    ns.attn_combine = attn_combine_kernel
    ns.prefill_attn = prefill_attn_kernel
    _TRITON = ns
    return ns


# ------------------------------------------------------------------------------------------------
# model inspection
# ------------------------------------------------------------------------------------------------
def _native_blocker(model, max_seq_len: int) -> str | None:
    """Why the native forward cannot run this model (None: it can)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in _NATIVE_TYPES:
        return f"model_type {mt!r} has no native forward (native: {sorted(_NATIVE_TYPES)})"
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} (native forward is SwiGLU only)"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "q_proj") \
            or not hasattr(layers[0], "mlp") or not hasattr(layers[0].mlp, "gate_proj") \
            or getattr(inner, "rotary_emb", None) is None:
        return "module layout is not the Llama one"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    orig = (rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None) \
        or getattr(cfg, "max_position_embeddings", max_seq_len)
    if rope_type in ("dynamic", "longrope") and max_seq_len > orig:
        return f"rope_type {rope_type!r} changes with the sequence length beyond {orig}"
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        sliding = any(t == "sliding_attention" for t in layer_types)
    else:
        sliding = window is not None and getattr(cfg, "use_sliding_window", True) is not False
    if sliding and window is not None and window < max_seq_len:
        return f"sliding window {window} < max_seq_len {max_seq_len}"
    return None


class _Layer:
    __slots__ = ("in_norm", "wqkv", "bqkv", "wo", "bo", "post_norm", "wgu", "bgu", "wd", "bd",
                 "q_norm", "k_norm", "kc", "vc")


def _t(x, device, dtype):
    return None if x is None else x.detach().to(device=device, dtype=dtype)


def _fused(mods, device, dtype):
    w = torch.cat([m.weight.detach().to(device=device, dtype=dtype) for m in mods], 0).contiguous()
    biases = [getattr(m, "bias", None) for m in mods]
    if all(b is None for b in biases):
        return w, None
    b = torch.cat([(torch.zeros(m.weight.shape[0], device=device, dtype=dtype) if bb is None
                    else bb.detach().to(device=device, dtype=dtype)) for m, bb in zip(mods, biases)], 0)
    return w, b.contiguous()


# ------------------------------------------------------------------------------------------------
# fallback: transformers itself, one DynamicCache per slot
# ------------------------------------------------------------------------------------------------
class _HFSlots:
    def __init__(self, model, max_slots: int, device):
        self.model = model
        self.device = device
        self.caches: list = [None] * max_slots

    def _run(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        if self.caches[slot] is None:
            self.caches[slot] = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids.view(1, -1), past_key_values=self.caches[slot], use_cache=True)
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1]

    def prefill(self, slot, ids):
        self.caches[slot] = None
        return self._run(slot, ids).float()[None]

    def decode(self, slots, tokens):
        return torch.stack([self._run(int(s), t.view(1)) for s, t in zip(slots.tolist(), tokens)]).float()

    def release(self, slot):
        self.caches[slot] = None


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
class TorchEngine(Engine):
    def __init__(self, model_path: str | os.PathLike | None = None, max_slots: int = 8,
                 max_seq_len: int = 2048, device: str = "cuda", dtype: str = "bfloat16",
                 cuda_graphs: bool = True, graph_batch_sizes: list[int] | None = None, *,
                 model=None, kernels: str = "auto", attention: str = "auto",
                 length_bucket: int = 256, prefill_graphs: bool = True, prefill_graph_tokens: int = 2048,
                 mix_tokens: int = 1024, **_unused):
        """`model_path`: a Hugging Face model folder; or pass an already built transformers
        `model=` (its weights are read, fused and cast; unfused ones already on `device` in `dtype`
        are shared, not copied). `kernels`: "auto" | "triton" | "torch"; `attention`: "auto" |
        "triton" (in-place split-K decode attention) | "sdpa" (gather + masked SDPA); "auto" picks
        Triton on CUDA when it imports. `length_bucket`: SDPA attention length granularity in graphs.
        `prefill_graphs` (with `cuda_graphs`): run prefills of up to `prefill_graph_tokens` prompt
        tokens as CUDA graphs, one per bucket (`_prefill_buckets`; with the Triton attention all
        captured by `warmup()`). A prefill is launch-bound (~330 kernel launches from Python):
        H200, 1 / 4 / 16 prompts of 128 tokens 7.1 / 6.9 / 8.8 ms eager, 1.9 / 2.8 / 8.2 ms as graphs
        (benchmarks/gpu_prefill.py, which also checks both agree in float32).
        `mix_tokens`: prompt tokens (of at most MIX_PROMPTS prompts) that one decode step can carry
        (`decode_greedy_begin(prompts=...)`); 0: none (`can_mix` False)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("TorchEngine(device='cuda') but torch sees no CUDA device")
        self.dtype = _as_dtype(dtype)
        self.max_slots = int(max_slots)
        self.max_seq_len = int(max_seq_len)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.length_bucket = max(1, int(length_bucket))
        self._lengths = np.zeros(self.max_slots, dtype=np.int64)

        owned = model is None
        if model is None:
            if model_path is None:
                raise ValueError("TorchEngine needs model_path or model=")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=self.dtype)
        model.eval()
        self.config = model.config
        self.blocker = _native_blocker(model, self.max_seq_len)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

        if self.blocker is not None:
            warnings.warn(f"TorchEngine: no native forward ({self.blocker}); using the slow "
                          "transformers fallback (one DynamicCache per slot, one sequence at a time)")
            self.path = "hf-fallback"
            self.cuda_graphs = False
            self.kernels = self.attention = "hf"
            self._hf = _HFSlots(model.to(device=self.device, dtype=self.dtype), self.max_slots, self.device)
            return
        self.path = "native"
        self._hf = None
        self.can_chain = True  # decode_greedy_begin(chain=...) launches without waiting
        self.mix_tokens = max(0, int(mix_tokens))
        self.mix_prompts = MIX_PROMPTS
        self.can_mix = self.mix_tokens > 0  # decode_greedy_begin(prompts=...): prompts ride in a step

        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, not {kernels!r}")
        tk = _triton_kernels() if kernels in ("auto", "triton") or attention == "triton" else None
        if kernels == "triton" and tk is None:
            raise RuntimeError("kernels='triton' but Triton does not import")
        use_triton = tk is not None and (kernels == "triton" or (kernels == "auto" and self.device.type == "cuda"))
        self.kernels = "triton" if use_triton else "torch"
        if attention == "auto":
            attention = "triton" if tk is not None and self.device.type == "cuda" else "sdpa"
        if attention == "triton" and tk is None:
            raise RuntimeError("attention='triton' but Triton does not import")
        if attention not in ("triton", "sdpa"):
            raise ValueError(f"attention must be auto, triton or sdpa, not {attention!r}")
        self.attention = attention
        self._tk = tk
        self._load_native(model)
        if owned:
            del model

        sizes = sorted({int(s) for s in (graph_batch_sizes or
                                          [s for s in _DEFAULT_GRAPH_SIZES if s < self.max_slots]
                                          + [self.max_slots]) if int(s) > 0})
        self.graph_batch_sizes = sizes
        self._graphs: dict = {}
        self.prefill_graphs = bool(prefill_graphs) and self.cuda_graphs
        self.prefill_graph_tokens = int(prefill_graph_tokens)
        self._prefill_graphs: dict = {}  # (tokens, prompts, width) buckets -> (graph, input, logits) or None
        self._prefill_pool = None
        self._pool = None
        # graphs captured so far and the time it took (a capture on first use stalls every stream)
        self.captures = {"decode": 0, "decode_s": 0.0, "prefill": 0, "prefill_s": 0.0, "mixed": 0, "mixed_s": 0.0}
        # a decode step's int64 inputs, one row each: tokens, slots, positions, "take the token from
        # the previous step" flags, then BAN_IDS rows of banned ids (-1: none); see `_step_body`
        top = sizes[-1] + MIX_PROMPTS
        # the last greedy id of each slot (the dummy slot last), written by every greedy step: a
        # chained step reads its rows' tokens from here, whatever rows the previous step had
        self._last_ids = torch.zeros(self.max_slots + 1, dtype=torch.int64, device=self.device)
        self._last_step = None
        self._mix_graphs: dict = {}  # (batch, length bucket, prompt key) -> (graph, (logits, ids)) or None
        if self.cuda_graphs:
            self._in = torch.zeros((_IN_ROWS, sizes[-1]), dtype=torch.int64, device=self.device)
            # two pinned staging buffers, used in turn: with a step in flight, the copy of the
            # previous one may not have run yet when the next step's inputs are written
            self._in_host = [torch.zeros((_IN_ROWS, sizes[-1]), dtype=torch.int64).pin_memory() for _ in range(2)]
            self._turn = 0
            # the same for steps that carry prompts: step rows, then the prompts' layout, flat
            m = (_IN_ROWS * top + self._layout_size(self._prefill_buckets(np.array([self.mix_tokens]))[0], mixed=True)
                 if self.can_mix else 1)
            self._mix_in = torch.zeros(m, dtype=torch.int64, device=self.device)
            self._mix_host = [torch.zeros(m, dtype=torch.int64).pin_memory() for _ in range(2)]
            self._mix_turn = 0
            # pinned buffers and events for the steps' ids, used in turn (see `_Step`)
            self._ids_host = [torch.zeros(top, dtype=torch.int64).pin_memory() for _ in range(_RING)]
            self._ids_owner: list = [None] * _RING
            self._events = [torch.cuda.Event() for _ in range(_RING)]
            self._ring = 0
        self._sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                     if self.device.type == "cuda" else 8)
        self.split_min = SPLIT_MIN_POSITIONS

    # -- weights -----------------------------------------------------------------------------
    def _load_native(self, model):
        cfg, dev, dt = model.config, self.device, self.dtype
        inner = model.model
        self.num_layers = len(inner.layers)
        attn0 = inner.layers[0].self_attn
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.hidden = int(cfg.hidden_size)
        self.group = self.num_heads // self.num_kv_heads
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.intermediate = int(inner.layers[0].mlp.gate_proj.weight.shape[0])

        with torch.no_grad():
            self.embed = _t(inner.embed_tokens.weight, dev, dt)
            lm = model.get_output_embeddings().weight
            self.lm_head = self.embed if lm is inner.embed_tokens.weight else _t(lm, dev, dt)
            self.norm = _t(inner.norm.weight, dev, dt)
            shape = (self.max_slots + 1, self.num_kv_heads, self.max_seq_len, self.head_dim)
            self.layers = []
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                L = _Layer()
                L.in_norm = _t(layer.input_layernorm.weight, dev, dt)
                L.post_norm = _t(layer.post_attention_layernorm.weight, dev, dt)
                L.wqkv, L.bqkv = _fused([a.q_proj, a.k_proj, a.v_proj], dev, dt)
                L.wo, L.bo = _t(a.o_proj.weight, dev, dt), _t(getattr(a.o_proj, "bias", None), dev, dt)
                L.wgu, L.bgu = _fused([m.gate_proj, m.up_proj], dev, dt)
                L.wd, L.bd = _t(m.down_proj.weight, dev, dt), _t(getattr(m.down_proj, "bias", None), dev, dt)
                qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
                L.q_norm = None if qn is None else _t(qn.weight, dev, dt)
                L.k_norm = None if kn is None else _t(kn.weight, dev, dt)
                # zeros, not empty: SDPA multiplies masked positions by 0, and 0 * NaN is NaN
                L.kc = torch.zeros(shape, device=dev, dtype=dt)
                L.vc = torch.zeros(shape, device=dev, dtype=dt)
                self.layers.append(L)
            # cos / sin exactly as HF computes them (float32, then cast to the model dtype)
            rot = inner.rotary_emb
            ref_dev = rot.inv_freq.device
            pos = torch.arange(self.max_seq_len, device=ref_dev)[None]
            cos, sin = rot(torch.zeros(1, device=ref_dev, dtype=dt), pos)
            self.cos = cos[0].to(dev).contiguous()
            self.sin = sin[0].to(dev).contiguous()
            self._arange = torch.arange(self.max_seq_len, device=dev)
        self.dummy_slot = self.max_slots

    # -- small ops ---------------------------------------------------------------------------
    def _rms(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _add_norm(self, x, res, w):
        """(rmsnorm(res + x) * w, res + x); with the Triton kernel `res` is updated in place."""
        if self.kernels == "triton":
            rows, n = x.shape
            y = torch.empty_like(x)
            blk = _next_pow2(n)
            r = x if res is None else res
            self._tk.add_rmsnorm[(rows,)](x, r, w, y, x.stride(0), r.stride(0), y.stride(0), n, self.eps,
                                          HAS_RES=res is not None, BLOCK=blk,
                                          num_warps=8 if blk >= 2048 else 4)
            return y, r
        res = x if res is None else res + x
        return self._rms(res, w), res

    def _qk_norm(self, qkv, L):
        n, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q = self._rms(qkv[:, :hq * d].reshape(n, hq, d), L.q_norm).reshape(n, hq * d)
        k = self._rms(qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d), L.k_norm).reshape(n, hkv * d)
        return torch.cat([q, k, qkv[:, (hq + hkv) * d:]], 1)

    def _rope_write(self, qkv, slots, pos, L, normed: bool = False):
        """Rotate q and k of rows `qkv` at positions `pos`; store k, v at [slots, :, pos]; return q [rows, Hq, D]."""
        n, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if L.q_norm is not None and not normed:
            qkv = self._qk_norm(qkv, L)
        if self.kernels == "triton":
            q = torch.empty((n, hq, d), device=qkv.device, dtype=qkv.dtype)
            kc = L.kc
            self._tk.rope_kv[(n, hq + hkv)](qkv, self.cos, self.sin, slots, pos, q, kc, L.vc,
                                            qkv.stride(0), self.cos.stride(0),
                                            kc.stride(0), kc.stride(1), kc.stride(2),
                                            HQ=hq, HKV=hkv, D=d, DP=max(16, _next_pow2(d)), num_warps=1)
            return q
        q = qkv[:, :hq * d].view(n, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        c, s = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        half = d // 2

        def rot(x):
            return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s

        q, k = rot(q), rot(k)
        L.kc[slots, :, pos] = k
        L.vc[slots, :, pos] = v
        return q

    def _silu_mul(self, gu):
        if self.kernels == "triton":
            rows, i = gu.shape[0], gu.shape[1] // 2
            out = torch.empty((rows, i), device=gu.device, dtype=gu.dtype)
            blk = 1024
            self._tk.silu_mul[(rows, triton_cdiv(i, blk))](gu, out, gu.stride(0), out.stride(0), i, BLOCK=blk,
                                                          num_warps=4)
            return out
        g, u = gu.chunk(2, -1)
        return F.silu(g) * u

    # -- attention ---------------------------------------------------------------------------
    def _attn_prefill(self, q, L, pack):
        """Causal attention of packed prompts: each prompt is right-padded to the longest, its keys
        read from its own slot [0, longest); a query at position i < n sees keys 0..i, all its own,
        so padding never leaks into a real row."""
        slots, rows, valid, width = pack
        b, hq, d = len(slots), self.num_heads, self.head_dim
        qq = q.view(-1, hq, d)[rows].transpose(1, 2)  # [b, Hq, width, D]
        k = L.kc[slots, :, :width]
        v = L.vc[slots, :, :width]
        with _no_cudnn_sdpa():
            try:
                out = F.scaled_dot_product_attention(qq, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            except (TypeError, RuntimeError):
                k = k.repeat_interleave(self.group, 1)
                v = v.repeat_interleave(self.group, 1)
                out = F.scaled_dot_product_attention(qq, k, v, is_causal=True, scale=self.scale)
        out = out.transpose(1, 2).reshape(b * width, hq * d)
        return out[valid]

    def _attn_prefill_varlen(self, q, L, table, nb: int, out):
        """Causal attention of packed prompts into `out`, one Triton program per (query block, q
        head) from `table` (see `_prefill_layout`); rows of padding tokens are zeroed."""
        n, hq, d = q.shape
        out.zero_()
        kc = L.kc
        self._tk.prefill_attn[(nb, hq)](
            q, kc, L.vc, table, out, q.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
            self.scale * 1.4426950408889634, HQ=hq, G=self.group, D=d, DP=max(16, _next_pow2(d)),
            BLOCK_M=PREFILL_BLOCK, BLOCK_N=64 if d <= 128 else 32, IEEE=q.dtype == torch.float32, num_warps=4)
        return out

    def _splits(self, b: int) -> int:
        return decode_attention_config(b, self.num_kv_heads, self.head_dim, self.max_seq_len, self._sms,
                                       self.split_min)[0]

    def _attn_decode(self, qkv, L, slots, pos, tb, out=None):
        """Decode attention of the step's q/k/v rows `qkv` [b, (Hq + 2 Hkv) x D]: RoPE at `pos`, the
        new key and value written to the cache at [slots, :, pos], the query against [0, pos]."""
        b, hq, hkv, d, g = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim, self.group
        if L.q_norm is not None:
            qkv = self._qk_norm(qkv, L)
        if self.attention == "triton":  # RoPE and the cache write inside the attention kernel
            ns, block_n = decode_attention_config(b, hkv, d, self.max_seq_len, self._sms, self.split_min)
            chunk = triton_cdiv(triton_cdiv(self.max_seq_len, ns), block_n) * block_n
            dp = max(16, _next_pow2(d))
            if out is None:
                out = torch.empty((b, hq * d), device=qkv.device, dtype=qkv.dtype)
            if ns > 1:  # partial results for the combine kernel
                acc = torch.empty((b, hq, ns, dp), device=qkv.device, dtype=torch.float32)
                mx = torch.empty((b, hq, ns), device=qkv.device, dtype=torch.float32)
                lx = torch.empty((b, hq, ns), device=qkv.device, dtype=torch.float32)
            else:
                acc = mx = lx = out  # not written
            kc = L.kc
            self._tk.attn_split[(b, hkv, ns)](
                qkv, kc, L.vc, slots, pos, acc, mx, lx, out, self.cos, self.sin, qkv.stride(0), self.cos.stride(0),
                kc.stride(0), kc.stride(1), kc.stride(2), self.scale * 1.4426950408889634, HQ=hq, HKV=hkv, NS=ns,
                CHUNK=chunk, G=g, GP=max(16, _next_pow2(g)), D=d, DP=dp, BLOCK_N=block_n,
                IEEE=qkv.dtype == torch.float32, ROPE=True, num_warps=4)
            if ns > 1:
                self._tk.attn_combine[(b, hq)](acc, mx, lx, out, HQ=hq, NS=ns, D=d, DP=dp, num_warps=1)
            return out
        q = self._rope_write(qkv, slots, pos, L, normed=True)
        # gather the batch's slots up to `tb` positions, mask each row past its own length
        k = L.kc[:, :, :tb].index_select(0, slots)  # [b, Hkv, tb, D]
        v = L.vc[:, :, :tb].index_select(0, slots)
        mask = (self._arange[:tb][None, :] <= pos[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(q.view(b, hkv, g, d), k, v, attn_mask=mask, scale=self.scale)
        return o.reshape(b, hq * d) if out is None else out.copy_(o.reshape(b, hq * d))

    # -- forward -----------------------------------------------------------------------------
    def _forward(self, tok, attn, last=None):
        """Hidden states after the final norm; `attn(qkv, L)`: a layer's attention output from its
        q/k/v rows (RoPE and the cache write included)."""
        x = F.embedding(tok, self.embed)
        res = None
        for L in self.layers:
            h, res = self._add_norm(x, res, L.in_norm)
            qkv = F.linear(h, L.wqkv, L.bqkv)
            o = F.linear(attn(qkv, L), L.wo, L.bo)
            h, res = self._add_norm(o, res, L.post_norm)
            x = F.linear(self._silu_mul(F.linear(h, L.wgu, L.bgu)), L.wd, L.bd)
        if last is not None:  # prefill: only the last row of each prompt goes on to the head
            x, res = x[last], res[last]
        h, _ = self._add_norm(x, res, self.norm)
        return h

    def _decode_body(self, tok, slots, pos, tb):
        h = self._forward(tok, lambda qkv, L: self._attn_decode(qkv, L, slots, pos, tb))
        return F.linear(h, self.lm_head)

    def _mixed_body(self, tok, slots, pos, tb, buf, key) -> torch.Tensor:
        """Logits [decode rows + prompt capacity, vocab] of a decode step that carries prompts:
        the decode rows (`tok`, `slots`, `pos`) and the prompts' packed tokens (`buf`, `key`: see
        `_prefill_layout`, mixed) go through the projections and the MLP as one batch (at decode
        batch sizes the products read the weights once for both); attention is the decode kernel
        for the decode rows and the prompts' causal attention for theirs. The head sees every
        decode row and each prompt's last row."""
        b = tok.shape[0]
        ptok, pslot, ppos, plast, pattn = self._prompt_inputs(buf, key, mixed=True)
        hq, d = self.num_heads, self.head_dim

        def attn(qkv, L):
            out = torch.empty((qkv.shape[0], hq * d), device=qkv.device, dtype=qkv.dtype)
            if b:
                self._attn_decode(qkv[:b], L, slots, pos, tb, out[:b])
            pattn(self._rope_write(qkv[b:], pslot, ppos, L), L, out[b:])
            return out
        last = torch.cat([self._arange[:b], plast + b])
        h = self._forward(torch.cat([tok, ptok]), attn, last=last)
        return F.linear(h, self.lm_head)

    def _step_body(self, inp: torch.Tensor, tb, mix=None):
        """One decode step from its input rows `inp` [_IN_ROWS, b] (see `_step_inputs`): logits
        [b, vocab] (the model's dtype: the argmax of bf16 logits is that of their exact float32
        copy, which the old extra kernel made; banned cells -inf) and their argmax [b], which also goes to
        `_last_ids` (per slot) for a chained step. Everything a greedy step needs happens here, so
        a graph replay plus two copies is the whole step on the host: each extra op was a GIL
        release that the other threads of the server process could hold on to. `mix` = (prompt
        layout, key): the step also runs prompts (`_mixed_body`); then the last `_mix_cols(key)`
        columns of `inp` stand for the prompts (their slots and bans; padding: the dummy slot)."""
        b = inp.shape[1] - (0 if mix is None else self._mix_cols(mix[1]))
        slots = inp[1]
        tok = torch.where(inp[3, :b] > 0, self._last_ids[slots[:b]], inp[0, :b])
        if mix is None:
            logits = self._decode_body(tok, slots, inp[2], tb)
        else:
            logits = self._mixed_body(tok, slots[:b], inp[2, :b], tb, *mix)
        ban = inp[4:].t()  # [rows, BAN_IDS]; -1: nothing (its cap is +inf, which `amin` ignores)
        cap = torch.where(ban >= 0, float("-inf"), float("inf")).to(logits.dtype)
        logits.scatter_reduce_(1, ban.clamp(min=0), cap, reduce="amin", include_self=True)
        ids = logits.argmax(dim=-1)
        self._last_ids.index_copy_(0, slots, ids)  # padding rows all write the dummy slot's
        return logits, ids

    # -- CUDA graphs -------------------------------------------------------------------------
    def _graph_size(self, n: int) -> int | None:
        for s in self.graph_batch_sizes:
            if s >= n:
                return s
        return None

    def _len_bucket(self, top: int) -> int | None:
        if self.attention == "triton":
            return None
        return min(self.max_seq_len, triton_cdiv(top, self.length_bucket) * self.length_bucket)

    def _record(self, fn, pool):
        """`fn()` run twice on a side stream (Triton compiles, cuBLAS settles its workspaces), then
        captured into a CUDA graph in `pool`; returns (graph, what `fn` returned). Not through
        `torch.cuda.graph(...)`: its `__enter__` empties the device and pinned-host allocator
        caches before every capture, so each capture made while the server runs (a prefill bucket
        seen for the first time) was followed by synchronising cudaMalloc / cudaHostAlloc calls."""
        cur = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(cur)
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool)
            try:
                out = fn()
            finally:
                graph.capture_end()
        cur.wait_stream(stream)
        return graph, out

    def _safe_step_inputs(self, inp: torch.Tensor) -> torch.Tensor:
        """Fill step input rows so that every row is token 0 at position 0 of the dummy slot,
        nothing banned: warm-up and capture touch the dummy slot only."""
        inp.zero_()
        inp[1].fill_(self.dummy_slot)
        inp[4:].fill_(-1)
        return inp

    def _capture(self, b: int, tb):
        """Capture the decode step for padded batch `b` (and SDPA length bucket `tb`)."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        saved = self._last_ids.clone()  # a capture between two chained steps must not lose the ids
        inp = self._safe_step_inputs(self._in[:, :b])
        self._graphs[(b, tb)] = self._record(lambda: self._step_body(inp, tb), self._pool)
        self._last_ids.copy_(saved)
        self.captures["decode"] += 1
        self.captures["decode_s"] += time.perf_counter() - t0

    def _capture_mixed(self, b: int, tb, key):
        """Capture the decode step of padded batch `b` carrying prompts of bucket `key` (varlen)."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        saved = self._last_ids.clone()
        cols = b + self._mix_cols(key)
        layout = torch.from_numpy(self._safe_layout(key, mixed=True)).to(self.device)
        m = _IN_ROWS * cols + len(layout)
        inp = self._safe_step_inputs(self._mix_in[:_IN_ROWS * cols].view(_IN_ROWS, cols))
        self._mix_in[_IN_ROWS * cols:m].copy_(layout)
        buf = self._mix_in[_IN_ROWS * cols:m]
        self._mix_graphs[(b, tb, key)] = self._record(lambda: self._step_body(inp, tb, (buf, key)), self._pool)
        self._last_ids.copy_(saved)
        self.captures["mixed"] += 1
        self.captures["mixed_s"] += time.perf_counter() - t0

    def _token_buckets(self, limit: int):
        """Every prefill bucket (Triton attention: the token count) of 1 to `limit` tokens."""
        n = 1
        while n <= limit:
            key = self._prefill_buckets(np.array([n]))
            yield key
            n = key[0] + 1  # the next bucket's first token count

    def warmup(self) -> None:
        """Capture the decode graphs of every batch size now (SDPA attention: the first length
        bucket), run one small batched prefill (kernel selection, allocator pools) and capture
        the prefill graphs: a capture on first use stalls every running stream (H100: ~60 ms
        alone, 100-300 ms in a busy server). With the Triton attention that is every token bucket
        (H100, budget 2,048: 10 graphs), so no prefill is captured while serving; with SDPA one
        prompt of every width bucket (buckets of several prompts are captured on first use)."""
        if not self.cuda_graphs:
            return
        n = min(4, self.max_slots)
        self.prefill_batch(list(range(n)), [np.ones(min(16, self.max_seq_len - 1), dtype=np.int64)] * n)
        for slot in range(n):
            self.release(slot)
        with torch.no_grad():
            for b in self.graph_batch_sizes:
                key = (b, self._len_bucket(1))
                if key not in self._graphs:
                    self._capture(*key)
            for key in self._warmup_prefill_keys() if self.prefill_graphs else ():
                if key not in self._prefill_graphs:
                    self._capture_prefill(key)
            if self.can_mix and self.attention == "triton":  # steps carrying prompts, every bucket
                for b in self.graph_batch_sizes:
                    for key in self._token_buckets(self.mix_tokens):
                        if (b, None, key) not in self._mix_graphs:
                            self._capture_mixed(b, None, key)
        torch.cuda.synchronize(self.device)

    def _warmup_prefill_keys(self):
        """The prefill graph keys `warmup()` captures: every token bucket up to
        `prefill_graph_tokens` with the Triton attention, one prompt of every width bucket with SDPA."""
        if self.attention == "triton":
            yield from self._token_buckets(self.prefill_graph_tokens)
            return
        w = 16
        while w <= min(self.max_seq_len - 1, self.prefill_graph_tokens):
            yield self._prefill_buckets(np.array([w]))
            w *= 2

    # -- Engine API ------------------------------------------------------------------------
    def _to_host(self, out: torch.Tensor, n: int) -> np.ndarray:
        if out.device.type == "cpu":
            return out[:n].float().numpy()
        host = torch.empty((n, out.shape[1]), dtype=torch.float32, pin_memory=True)
        host.copy_(out[:n], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()

    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        return self.prefill_batch([slot], [token_ids])[0]

    def prefill_batch(self, slots, prompts) -> np.ndarray:
        """All prompts in one forward: projections and MLP over the packed tokens, attention per
        prompt on the right-padded batch (see `_attn_prefill`)."""
        slots, ids, lens = self._new_prompts(slots, prompts)
        slots = slots.tolist()
        with torch.no_grad():
            if self._hf is not None:
                logits = torch.cat([self._hf.prefill(s, torch.from_numpy(p).to(self.device))
                                    for s, p in zip(slots, ids)])
            elif self.prefill_graphs and int(lens.sum()) <= self.prefill_graph_tokens:
                logits = self._prefill_graphed(slots, ids, lens)
            else:  # the same forward, unpadded
                key = self._exact_key(lens)
                layout = torch.from_numpy(self._prefill_layout(slots, ids, lens, key))
                logits = self._prefill_body(layout.to(self.device, non_blocking=True), key)
            out = self._to_host(logits, len(slots))
        self._lengths[slots] = lens
        return out

    # -- prefill as CUDA graphs -------------------------------------------------------------------
    def _prefill_buckets(self, lens: np.ndarray) -> tuple:
        """A prefill graph's key. Tokens are padded to a power of two (>= 64) up to
        PREFILL_TOKEN_STEP and to a multiple of it above (a prefill is compute-bound there: 9
        prompts of 128 padded to 2,048 tokens cost as much as 16). With the Triton attention the
        key is (tokens,): prompts of any number and length share it, so warm-up captures every
        bucket. With SDPA (right-padded prompts): (tokens, prompts, width), prompts and width
        (>= 16) padded to powers of two, captured on first use."""
        n = int(lens.sum())
        step = PREFILL_TOKEN_STEP
        t = max(64, _next_pow2(n)) if n <= step else triton_cdiv(n, step) * step
        if self.attention == "triton":
            return (t,)
        b = _next_pow2(len(lens))
        w = min(self.max_seq_len, max(16, _next_pow2(int(lens.max()))))
        return t, b, w

    def _exact_key(self, lens: np.ndarray) -> tuple:
        """The key of a prefill run eagerly on exactly its prompts: (tokens,) varlen, else (tokens,
        prompts, longest prompt)."""
        n = int(lens.sum())
        return (n,) if self.attention == "triton" else (n, len(lens), int(lens.max()))

    def _varlen_dims(self, t: int, mixed: bool = False) -> tuple[int, int]:
        """(prompts, query blocks) a varlen prefill of `t` tokens has room for: at most one prompt
        per token and per slot (MIX_PROMPTS in a decode step); each prompt's blocks of PREFILL_BLOCK
        queries."""
        pb = min(t, self.max_slots, MIX_PROMPTS if mixed else t)
        return pb, triton_cdiv(t, PREFILL_BLOCK) + pb

    def _mix_cols(self, key) -> int:
        """Prompt columns of a decode step carrying prompts of bucket `key`."""
        return self._varlen_dims(key[0], True)[0] if len(key) == 1 else key[1]

    def _layout_size(self, t: int, mixed: bool = False) -> int:
        """Length of a varlen prefill layout of bucket (t,) (see `_prefill_layout`)."""
        pb, nb = self._varlen_dims(t, mixed)
        return 3 * t + pb + 4 * nb

    def _prefill_layout(self, slots, ids, lens, key, mixed: bool = False) -> np.ndarray:
        """A prefill's int64 inputs for `key`, in one vector: tokens, slot of each token, positions
        [t each]; then for (tokens t,) (varlen): last row of each prompt [prompts], one
        (first row, slot, first position, queries) row per query block [blocks x 4]; for (tokens t,
        prompts b, width w) (padded): cell -> packed row [b * w]; packed row -> cell [t]; last row
        of each prompt, slots [b each]. Where `key` is larger than the prompts (a graph's bucket),
        padding tokens write their K/V into the dummy slot; padding prompts (padded layout) read
        it, padding query blocks (varlen) do nothing."""
        t = key[0]
        n, k = int(lens.sum()), len(slots)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        tok = np.zeros(t, np.int64)
        tok[:n] = np.concatenate(ids)
        slot_of = np.full(t, self.dummy_slot, np.int64)
        slot_of[:n] = np.repeat(slots, lens)
        pos = np.zeros(t, np.int64)
        pos[:n] = np.concatenate([np.arange(m) for m in lens])
        if len(key) == 1:
            pb, nb = self._varlen_dims(t, mixed)
            last = np.zeros(pb, np.int64)
            last[:k] = starts + lens - 1
            table = np.zeros((nb, 4), np.int64)
            table[:, 1] = self.dummy_slot
            q0 = [np.arange(0, m, PREFILL_BLOCK) for m in lens]
            blocks = np.concatenate(q0)
            owner = np.repeat(np.arange(k), [len(x) for x in q0])
            nbk = len(blocks)
            table[:nbk, 0] = starts[owner] + blocks
            table[:nbk, 1] = np.asarray(slots, np.int64)[owner]
            table[:nbk, 2] = blocks
            table[:nbk, 3] = np.minimum(PREFILL_BLOCK, lens[owner] - blocks)
            return np.concatenate([tok, slot_of, pos, last, table.reshape(-1)])
        _, b, w = key
        grid = np.arange(w)[None, :]
        real = grid < lens[:, None]  # [k, w]
        rows = np.zeros((b, w), np.int64)
        rows[:k] = np.where(real, starts[:, None] + grid, 0)
        cells = np.zeros(t, np.int64)
        cells[:n] = (np.arange(k)[:, None] * w + grid)[real]
        last = np.zeros(b, np.int64)
        last[:k] = starts + lens - 1
        slot_t = np.full(b, self.dummy_slot, np.int64)
        slot_t[:k] = slots
        return np.concatenate([tok, slot_of, pos, rows.reshape(-1), cells, last, slot_t])

    def _safe_layout(self, key, mixed: bool = False) -> np.ndarray:
        """Inputs of `key` that touch nothing but the dummy slot: what a graph is captured with."""
        t = key[0]
        head = [np.zeros(t, np.int64), np.full(t, self.dummy_slot, np.int64), np.zeros(t, np.int64)]
        if len(key) == 1:
            pb, nb = self._varlen_dims(t, mixed)
            table = np.zeros((nb, 4), np.int64)
            table[:, 1] = self.dummy_slot
            return np.concatenate(head + [np.zeros(pb, np.int64), table.reshape(-1)])
        _, b, w = key
        return np.concatenate(head + [np.zeros(b * w + t + b, np.int64), np.full(b, self.dummy_slot, np.int64)])

    def _prompt_inputs(self, buf: torch.Tensor, key, mixed: bool = False):
        """(tokens, slot of each token, positions, last row of each prompt, attention(q, L, out))
        of the prompts whose inputs are `buf` (see `_prefill_layout`): attention per prompt, varlen
        (Triton) or on the right-padded batch (SDPA), into `out` [tokens, heads x head_dim]."""
        t = key[0]
        if len(key) == 1:
            pb, nb = self._varlen_dims(t, mixed)
            tok, slot_of, pos, last, table = torch.split(buf, [t, t, t, pb, 4 * nb])
            attn = lambda q, L, out: self._attn_prefill_varlen(q, L, table, nb, out)  # noqa: E731
        else:
            _, b, w = key
            tok, slot_of, pos, rows, cells, last, slot_t = torch.split(buf, [t, t, t, b * w, t, b, b])
            pack = (slot_t, rows.view(b, w), cells, w)
            attn = lambda q, L, out: out.copy_(self._attn_prefill(q, L, pack))  # noqa: E731
        return tok, slot_of, pos, last, attn

    def _prefill_body(self, buf: torch.Tensor, key) -> torch.Tensor:
        """Logits [prompts, vocab] of the prefill whose inputs are `buf` (see `_prefill_layout`):
        projections and MLP over the packed tokens, attention per prompt."""
        tok, slot_of, pos, last, pattn = self._prompt_inputs(buf, key)

        def attn(qkv, L):
            q = self._rope_write(qkv, slot_of, pos, L)
            out = torch.empty((q.shape[0], q.shape[1] * q.shape[2]), device=q.device, dtype=q.dtype)
            return pattn(q, L, out)
        h = self._forward(tok, attn, last=last)
        return F.linear(h, self.lm_head).float()

    def _prefill_graphed(self, slots, ids, lens) -> torch.Tensor:
        key = self._prefill_buckets(lens)
        if key not in self._prefill_graphs:
            self._capture_prefill(key)
        layout = torch.from_numpy(self._prefill_layout(slots, ids, lens, key))
        entry = self._prefill_graphs[key]
        if entry is None:  # this bucket could not be captured: the same padded forward, eagerly
            return self._prefill_body(layout.to(self.device), key)[: len(slots)]
        graph, buf, out = entry
        buf.copy_(layout.pin_memory(), non_blocking=True)
        graph.replay()
        return out[: len(slots)]

    def _capture_prefill(self, key) -> None:
        """Capture the prefill graph of bucket `key` into `_prefill_graphs` (None: it runs eagerly)."""
        t0 = time.perf_counter()
        self._prefill_graphs[key] = self._prefill_entry(key)
        self.captures["prefill"] += 1
        self.captures["prefill_s"] += time.perf_counter() - t0

    def _prefill_entry(self, key):
        buf = torch.from_numpy(self._safe_layout(key)).to(self.device)
        try:
            if self._prefill_pool is None:
                self._prefill_pool = torch.cuda.graph_pool_handle()
            graph, out = self._record(lambda: self._prefill_body(buf, key), self._prefill_pool)
            return graph, buf, out
        except Exception as exc:  # noqa: BLE001 - a bucket that cannot be captured runs eagerly
            warnings.warn(f"TorchEngine: prefill graph {key} not captured ({exc}); that bucket runs eagerly")
            torch.cuda.synchronize(self.device)
            return None

    def _step_inputs(self, a: np.ndarray, n: int, slots, tokens, pos, chained: bool, ban, cols=None,
                     pslots=()) -> None:
        """Write a step's input rows into `a` [_IN_ROWS, >= n]; columns past n are padding rows
        (token 0 at position 0 of the dummy slot, nothing banned). A step carrying prompts has its
        decode rows in columns [0, cols) and the prompts' from `cols` (their slots; padding: the
        dummy slot); ban rows past n are prompts."""
        a[0, :n] = 0 if tokens is None else tokens
        a[1, :n], a[2, :n], a[3, :n] = slots, pos, int(chained)
        a[0, n:], a[1, n:], a[2, n:], a[3, n:] = 0, self.dummy_slot, 0, 0
        if cols is not None:
            a[1, cols:cols + len(pslots)] = pslots
        a[4:] = -1
        if ban is not None:
            ids = np.asarray(ban.ids, dtype=np.int64).reshape(-1)
            a[4:4 + len(ids), self._ban_cols(ban, n, cols)] = ids[:, None]

    @staticmethod
    def _ban_cols(ban, n: int, cols) -> np.ndarray:
        rows = np.asarray(ban.rows, dtype=np.int64)
        return rows if cols is None else np.where(rows < n, rows, rows - n + cols)

    def _launch(self, slots: np.ndarray, tokens, pos: np.ndarray, chained: bool = False, ban=None, prompts=None):
        """Run one decode step on the device; return its device (logits, greedy ids, decode
        columns): rows [n, columns) are padding, and a step carrying `prompts` ((slots, token ids,
        lengths)) has their first tokens' rows from `columns` on. `chained`: the decode rows'
        tokens are the last ids of their slots, still on the device, instead of `tokens`. `ban`:
        ids masked out of some rows before the argmax."""
        n = len(slots)
        tb = self._len_bucket(int(pos.max()) + 1 if n else 1)
        b = self._graph_size(n) if self.cuda_graphs else None
        late = ban is not None and len(ban.ids) > BAN_IDS  # too many for the graph: banned after it
        inside = None if late else ban
        mix = key = None
        if prompts is not None:
            pslots, pids, lens = prompts
            key = self._prefill_buckets(lens) if b is not None else self._exact_key(lens)
            if b is not None and self.attention != "triton":
                b = None  # padded prompts: eager (the key has too many shapes to capture up front)
        if b is None:
            b = n
            k = 0 if key is None else self._mix_cols(key)
            a = np.empty((_IN_ROWS, n + k), dtype=np.int64)
            if key is None:
                self._step_inputs(a, n, slots, tokens, pos, chained, inside)
            else:
                self._step_inputs(a, n, slots, tokens, pos, chained, inside, n, pslots)
                layout = self._prefill_layout(pslots, pids, lens, key, mixed=True)
                mix = (torch.from_numpy(layout).to(self.device), key)
            if tb is not None:
                tb = int(pos.max()) + 1 if n else 1  # eager: the exact length, no bucket
            inp = torch.from_numpy(a).to(self.device, non_blocking=True)
            logits, ids = self._step_body(inp, tb, mix)
            dev_slots = inp[1]
        elif key is None:
            if (b, tb) not in self._graphs:
                self._capture(b, tb)
            host = self._in_host[self._turn]
            self._turn ^= 1
            self._step_inputs(host.numpy(), n, slots, tokens, pos, chained, inside)
            self._in.copy_(host, non_blocking=True)
            graph, (logits, ids) = self._graphs[(b, tb)]
            graph.replay()
            dev_slots = self._in[1, :b]
        else:
            gkey = (b, tb, key)
            if gkey not in self._mix_graphs:
                self._capture_mixed(*gkey)
            cols = b + self._mix_cols(key)
            host = self._mix_host[self._mix_turn]
            self._mix_turn ^= 1
            flat = host.numpy()
            self._step_inputs(flat[:_IN_ROWS * cols].reshape(_IN_ROWS, cols), n, slots, tokens, pos, chained,
                              inside, b, pslots)
            layout = self._prefill_layout(pslots, pids, lens, key, mixed=True)
            m = _IN_ROWS * cols + len(layout)
            flat[_IN_ROWS * cols:m] = layout
            self._mix_in[:m].copy_(host[:m], non_blocking=True)
            graph, (logits, ids) = self._mix_graphs[gkey]
            graph.replay()
            dev_slots = self._mix_in[cols:2 * cols]
        if late:
            cols = None if key is None else b
            ids = self._argmax_banned(logits, dataclasses.replace(ban, rows=self._ban_cols(ban, n, cols)))
            self._last_ids.index_copy_(0, dev_slots, ids)
        return logits, ids, b

    def _argmax_banned(self, logits: torch.Tensor, ban) -> torch.Tensor:
        """Argmax of `logits` (scratch: changed in place) with `ban` applied by indexing, outside any
        graph: the HF fallback, and bans of more than BAN_IDS ids."""
        if ban is not None:
            rows = torch.from_numpy(np.asarray(ban.rows, dtype=np.int64)).to(self.device)
            cols = torch.from_numpy(np.asarray(ban.ids, dtype=np.int64)).to(self.device)
            logits[rows[:, None], cols[None, :]] = float("-inf")
        return logits.argmax(dim=-1)

    def decode(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return self._decode(slots, tokens)

    def decode_greedy(self, slots: np.ndarray, tokens: np.ndarray, ban=None) -> np.ndarray:
        """Argmax on the device: copies len(slots) ids back instead of len(slots) x vocab logits."""
        return self.decode_greedy_begin(slots, tokens, ban).result()

    def _check(self, slots: np.ndarray, tokens) -> np.ndarray:
        n = len(slots)
        if tokens is not None and len(tokens) != n:
            raise ValueError("slots and tokens differ in length")
        if n and (slots.min() < 0 or slots.max() >= self.max_slots or len(set(slots.tolist())) != n):
            raise ValueError(f"slots must be distinct and in [0, {self.max_slots})")
        pos = self._lengths[slots]
        if n and int(pos.max()) + 1 > self.max_seq_len:
            raise ValueError("a sequence reached the end of its KV cache")
        return pos

    def decode_greedy_begin(self, slots, tokens=None, ban=None, chain: "_Step | None" = None,
                            prompts=None) -> "_Step":
        """Launch a greedy step and return at once; `.result()` waits for this step only.

        `chain`: a step in flight that wrote every row's slot (a decode row or a prompt of it):
        the last ids of those slots, still on the device, are this step's input (`tokens` None), so
        the host can do the previous step's bookkeeping while this one runs. The rows may differ
        from `chain`'s (sequences that ended are left out, prompts it carried come in). A slot
        released meanwhile just gets one stray KV column past its end, which the next sequence in
        that slot overwrites before reading.

        `prompts`: (slots, token id arrays) of new sequences (at most MIX_PROMPTS, `mix_tokens`
        tokens in all) prefilled inside this step, whose products they share; their first greedy
        ids follow the decode rows' in `.result()`, and `ban` rows past len(slots) are theirs."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if tokens is not None:
            tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        pos = self._check(slots, tokens)
        n = len(slots)
        mix = None
        if prompts is not None and len(prompts[0]):
            mix = self._check_prompts(slots, *prompts)
        k = 0 if mix is None else len(mix[0])
        if n + k == 0:
            return _Step(np.zeros(0, dtype=np.int64), None, 0)
        if chain is not None:
            if tokens is not None:
                raise ValueError("a chained step takes its tokens from `chain`, not `tokens`")
            missing = set(slots.tolist()) - set(chain.slots.tolist())
            if missing:
                raise ValueError(f"chained rows whose slots the previous step did not write: {sorted(missing)}")
            if self._hf is not None or chain is not self._last_step:  # not the step just launched
                last = dict(zip(chain.slots.tolist(), chain.result().tolist()))
                tokens, chain = np.array([last[s] for s in slots.tolist()], dtype=np.int64), None
        if tokens is None and chain is None and n:
            raise ValueError("decode_greedy_begin needs tokens or chain")
        all_slots = slots if mix is None else np.concatenate([slots, mix[0]])
        with torch.no_grad():
            if self._hf is not None:
                out = self._hf.decode(slots, torch.from_numpy(np.asarray(tokens)).to(self.device))
                ids = self._argmax_banned(out, ban).cpu()
                step = _Step(ids.numpy(), None, n, slots=slots)
            else:
                _, ids, cols = self._launch(slots, tokens, pos, chain is not None, ban, mix)
                if ids.device.type == "cpu":
                    host = ids[:n] if mix is None else torch.cat([ids[:n], ids[cols:cols + k]])
                    step = _Step(host.numpy(), None, n + k, slots=all_slots)
                else:  # the ids come back through one of _RING pinned buffers, taken in turn
                    r = self._ring
                    self._ring = (r + 1) % _RING
                    host = self._ids_host[r]
                    host[:n].copy_(ids[:n], non_blocking=True)
                    if k:
                        host[n:n + k].copy_(ids[cols:cols + k], non_blocking=True)
                    self._events[r].record(torch.cuda.current_stream(self.device))
                    step = _Step(host.numpy(), self._events[r], n + k, (self._ids_owner, r), all_slots)
                    self._ids_owner[r] = step
        self._last_step = step
        self._lengths[slots] = pos + 1
        if mix is not None:
            self._lengths[mix[0]] = mix[2]
        return step

    def _new_prompts(self, slots, prompts, busy=()):
        """(slots, id arrays, lengths) of prompts going into the empty `slots` (none of them among
        the `busy` decode rows), or ValueError."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        ids = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        if len(set(slots.tolist())) != len(slots) or len(slots) != len(ids):
            raise ValueError("a prefill needs one distinct slot per prompt")
        if set(slots.tolist()) & set(np.asarray(busy).tolist()):
            raise ValueError("prompt slots must be empty slots, not among the decode rows")
        for slot, p in zip(slots.tolist(), ids):
            if not 0 <= slot < self.max_slots:
                raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")
            if len(p) == 0:
                raise ValueError("empty prompt")
            if len(p) + 1 > self.max_seq_len:
                raise ValueError(f"prompt of {len(p)} tokens does not fit the context of {self.max_seq_len}")
        return slots, ids, np.array([len(p) for p in ids])

    def _check_prompts(self, slots, pslots, prompts):
        """(slots, id arrays, lengths) of prompts a step may carry, or ValueError."""
        if not self.can_mix:
            raise ValueError("this engine cannot run prompts inside a decode step")
        if len(prompts) > MIX_PROMPTS:
            raise ValueError(f"a step carries at most {MIX_PROMPTS} prompts")
        pslots, ids, lens = self._new_prompts(pslots, prompts, busy=slots)
        if lens.sum() > self.mix_tokens:
            raise ValueError(f"prompts of {lens.sum()} tokens: a step carries at most {self.mix_tokens}")
        return pslots, ids, lens

    def _decode(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        pos = self._check(slots, tokens)
        n = len(slots)
        if n == 0:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        with torch.no_grad():
            if self._hf is not None:
                out = self._hf.decode(slots, torch.from_numpy(tokens).to(self.device))
            else:
                out, _, _ = self._launch(slots, tokens, pos)
            self._last_step = None
            result = self._to_host(out, n)
        self._lengths[slots] = pos + 1
        return result

    def release(self, slot: int) -> None:
        self._lengths[int(slot)] = 0
        if self._hf is not None:
            self._hf.release(int(slot))

    def length(self, slot: int) -> int:
        return int(self._lengths[int(slot)])

    def describe(self) -> dict:
        d = {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
             "path": self.path, "kernels": self.kernels, "attention": self.attention,
             "cuda_graphs": self.cuda_graphs}
        if self.path == "native":
            d["graph_batch_sizes"] = self.graph_batch_sizes
            d["graphs_captured"] = sorted(self._graphs, key=lambda k: (k[0], k[1] or 0))
            d["captures"] = {k: round(v, 3) for k, v in self.captures.items()}
        else:
            d["fallback_reason"] = self.blocker
        return d


class _Step:
    """A greedy decode step in flight: its ids (one per slot of `slots`) land in `host` once `done`
    has passed. `ring`:
    (owners, k) when `host` is the k-th of the engine's pinned buffers taken in turn: reading it
    after _RING later steps reused it is an error, not a wrong answer."""

    __slots__ = ("host", "done", "n", "ring", "slots")

    def __init__(self, host, done, n, ring=None, slots=None):
        self.host, self.done, self.n, self.ring = host, done, n, ring
        self.slots = np.zeros(0, np.int64) if slots is None else slots  # the slot of each id

    def result(self) -> np.ndarray:
        if self.ring is not None:
            owners, k = self.ring
            if owners[k] is not self:
                raise RuntimeError(f"decode step read after {_RING} later steps reused its buffer")
            if self.done is not None:
                self.done.synchronize()
                self.done = None
            self.host, self.ring = self.host[: self.n].copy(), None
        return self.host[: self.n]


def decode_attention_config(b: int, kv_heads: int, head_dim: int, max_seq_len: int, sms: int,
                            split_min: int = SPLIT_MIN_POSITIONS) -> tuple[int, int]:
    """(splits, BLOCK_N) of the decode attention for `b` rows. Splits of each sequence's positions:
    1 (no combine kernel) once the batch's (row, kv head) programs fill every SM or the cache is
    short (at most `split_min` positions), else enough for about two programs per SM. A few rows in
    one split read keys in longer blocks (H100, 16 rows: 3.9 vs 5.8 us a layer)."""
    full = b * kv_heads >= sms
    if full or max_seq_len <= split_min:
        ns = 1
    else:
        want = _next_pow2(max(1, triton_cdiv(2 * sms, b * kv_heads)))
        ns = max(2, min(want, _next_pow2(max(1, triton_cdiv(max_seq_len, 64)))))
    block_n = 128 if ns == 1 and head_dim <= 64 and not full else (64 if head_dim <= 128 else 32)
    return ns, block_n


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))

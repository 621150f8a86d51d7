"""The native forward of Llama-family models over a slot KV cache, and the weights it reads.

Native path: model_type llama / mistral / qwen2 / qwen3, SiLU MLP, no sliding window shorter than
`max_seq_len` (`native_blocker` says why a model is refused; the engine then takes
`hf_fallback.HFSlots`). `Llama` reads the weights of the loaded transformers model, fusing the
q/k/v and the gate/up projections into one matrix each, and owns the KV cache: one tensor per layer
and K/V, shaped [max_slots + 1, kv_heads, max_seq_len, head_dim] (the extra last slot is the target
of padded rows). The forward is written here: RMSNorm, RoPE from the HF rotary module (so every
`rope_parameters` type HF knows is honoured), GQA attention, SwiGLU MLP, optional q/k/v/o biases,
Qwen3's q/k norms, tied embeddings. `weights="int8"` / `"fp8"`: the products' weights (q/k/v, o,
gate/up, down, the head) in 8 bits with a scale per output channel (`quant.py`; the embedding lookup
keeps the engine's dtype). Two sets of kernels implement the small ops:
  * "triton" (`kernels.py`; CUDA default when Triton imports): fused add+RMSNorm, RoPE + KV-cache
    write, SiLU*up, a split-K decode attention that reads the cache in place through the slot
    indices and per-slot lengths (flash-decoding style; no gather, no host sync; a combine kernel
    unless the batch fills the GPU with one split), and a varlen causal prefill attention over
    packed prompts (one program per block of queries, from a table of blocks).
  * "torch" (CPU, or anywhere as the reference): plain PyTorch ops; decode attention gathers the
    batch's slots up to a length bucket and runs masked `scaled_dot_product_attention`; prefill
    attention is causal SDPA per prompt over the right-padded batch.

Three forwards share one layer loop (`forward`), which takes the attention as a callable: a decode
step (`decode_logits`), a prefill (`prefill_logits`) and a decode step that carries prompts
(`mixed_logits`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .kernels import SPLIT_MIN_POSITIONS, cdiv, decode_attention_config, next_pow2
from .layout import PREFILL_BLOCK, Prompts
from .matmul import W8Matmul, pdl_launch
from .quant import WEIGHT_FORMATS, DenseWeight, QuantWeight, quantize_rows_fp8

NATIVE_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def native_blocker(model, max_seq_len: int) -> str | None:
    """Why the native forward cannot run this model (None: it can)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in NATIVE_TYPES:
        return f"model_type {mt!r} has no native forward (native: {sorted(NATIVE_TYPES)})"
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


class Layer:
    """One decoder layer's weights (fused, cast, on the device) and its K/V cache."""

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


def _no_cudnn_sdpa():
    """SDPA without the cuDNN backend (flash, memory-efficient or math instead). On the H100 torch
    picks cuDNN attention, which builds a plan for every new shape: slow on the first prefill of
    each (prompts, width) shape, which every running stream then waits for (figures:
    docs/benchmarks-gpu.md, "Figures behind settings in the code")."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: its default backends
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class Llama:
    """Weights, KV cache and forward of a Llama-family model (see the module docstring).

    `kernels`: "triton" | "torch" (the small ops); `attention`: "triton" (in-place split-K decode,
    varlen prefill) | "sdpa"; `tk`: the Triton kernels (`kernels.load_kernels()`) where either is
    Triton. `sms` and `split_min` choose the decode attention's splits (`decode_attention_config`).
    `weights`: "dtype" (the products' weights in `dtype`) | "int8" | "fp8" (see the module docstring);
    `w8a8_rows`: FP8 products of more rows run as W8A8 (matmul.py); None: never. `dense_kernel`:
    weights in `dtype` may run the kernel where faster than cuBLAS (quant.DenseWeight)."""

    def __init__(self, model, *, max_slots: int, max_seq_len: int, device: torch.device, dtype: torch.dtype,
                 kernels: str, attention: str, tk, weights: str = "dtype", pdl: bool = False,
                 w8a8_rows: int | None = None, dense_kernel: bool = True):
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, not {weights!r}")
        self.weights = weights
        self.max_slots, self.max_seq_len = max_slots, max_seq_len
        self.device, self.dtype = device, dtype
        self.kernels, self.attention, self._tk = kernels, attention, tk
        self._pdl = pdl_launch(pdl)  # the decode step's Triton launches (kernels.py, "PDL")
        cfg, dev, dt = model.config, device, dtype
        inner = model.model
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
                L = Layer()
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
        self.sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8
        self.split_min = SPLIT_MIN_POSITIONS
        self.mm = W8Matmul(tk if kernels == "triton" else None, self.sms, pdl=pdl, w8a8_rows=w8a8_rows)
        # W8A8 products take their input rounded by the norm or SiLU·up before them (`fp8_input`);
        # False: by a rounding kernel of their own (the benchmarks' comparison)
        self.fuse_fp8 = True
        # products with weights in `dtype` may run the 8-bit products' kernel where `W8Matmul.tune`
        # times it faster than cuBLAS (quant.DenseWeight); False: cuBLAS always. An attribute, read when
        # `tune` runs: the benchmarks switch it before they tune
        self.dense_kernel = dense_kernel
        if weights != "dtype":
            self._quantize(weights)
        elif kernels == "triton":
            self._wrap_dense()

    def _quantize(self, fmt: str):
        """Replace the products' weights by their 8-bit form, one at a time (the peak is one weight over)."""
        with torch.no_grad():
            for L in self.layers:
                for name in ("wqkv", "wo", "wgu", "wd"):
                    setattr(L, name, QuantWeight(getattr(L, name), fmt, self.dtype))
            self.lm_head = QuantWeight(self.lm_head, fmt, self.dtype)  # a tied head gets its own copy
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _wrap_dense(self):
        """The products' weights as `DenseWeight`s (the same tensors): `W8Matmul` decides per shape
        and row bucket whether cuBLAS or the kernel runs them."""
        for L in self.layers:
            for name in ("wqkv", "wo", "wgu", "wd"):
                setattr(L, name, DenseWeight(getattr(L, name)))
        self.lm_head = DenseWeight(self.lm_head)

    def kernel_weights(self) -> list:
        """The products' weights `W8Matmul.tune` times configurations for: the 8-bit ones, and the
        dense ones unless `dense_kernel` is off."""
        ws = [w for L in self.layers for w in (L.wqkv, L.wo, L.wgu, L.wd)] + [self.lm_head]
        return [w for w in ws if isinstance(w, QuantWeight) and (self.dense_kernel or not w.dense)]

    def own_rounding(self) -> frozenset:
        """The (N, K) of the 8-bit products whose rows no op before rounds to FP8 (`fp8_input`): the
        attention output's (o), and every one without `fuse_fp8` (`W8Matmul.tune`)."""
        ws = [w for L in self.layers for w in ((L.wo,) if self.fuse_fp8 else (L.wqkv, L.wo, L.wgu, L.wd))]
        return frozenset(tuple(w.q.shape) for w in ws + ([] if self.fuse_fp8 else [self.lm_head])
                         if isinstance(w, QuantWeight))

    def weight_bytes(self) -> int:
        """Bytes of weights a decode step reads (the products' and the norms'; not the embedding)."""
        def size(w):
            return 0 if w is None else (w.nbytes() if isinstance(w, QuantWeight) else w.numel() * w.element_size())
        return sum(size(getattr(L, n)) for L in self.layers for n in ("wqkv", "wo", "wgu", "wd", "in_norm",
                                                                       "post_norm")) + size(self.lm_head)

    def linear(self, x, w, b=None):
        if isinstance(x, tuple):  # rows already rounded to FP8 by the op before (`fp8_input`)
            return self.mm.scaled_rows(*x, w, b)
        return self.mm(x, w, b) if isinstance(w, QuantWeight) else F.linear(x, w, b)

    def fp8_input(self, x, w) -> bool:
        """Does the op making `x` round its rows to FP8 for the product with `w` (a W8A8 product:
        matmul.py), instead of a rounding kernel of the product's own?"""
        return self.fuse_fp8 and isinstance(w, QuantWeight) and self.mm.w8a8(x.shape[0], w)

    # -- small ops ---------------------------------------------------------------------------
    def rms(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def add_norm(self, x, res, w, fp8: bool = False):
        """(rmsnorm(res + x) * w, res + x); with the Triton kernel `res` is updated in place. `fp8`:
        the first is its rows rounded to E4M3 and their scales (`quantize_rows_fp8`'s pair)."""
        if self.kernels == "triton":
            rows, n = x.shape
            y = torch.empty((rows, n), device=x.device, dtype=torch.float8_e4m3fn if fp8 else x.dtype)
            qs = torch.empty((rows, 1), device=x.device, dtype=torch.float32) if fp8 else y
            blk = next_pow2(n)
            r = x if res is None else res
            self._tk.add_rmsnorm[(rows,)](x, r, w, y, qs, x.stride(0), r.stride(0), y.stride(0), n, self.eps,
                                          HAS_RES=res is not None, BLOCK=blk, FP8=fp8,
                                          num_warps=8 if blk >= 2048 else 4, **self._pdl)
            return ((y, qs) if fp8 else y), r
        res = x if res is None else res + x
        y = self.rms(res, w)
        return (quantize_rows_fp8(y) if fp8 else y), res

    def qk_norm(self, qkv, L):
        n, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q = self.rms(qkv[:, :hq * d].reshape(n, hq, d), L.q_norm).reshape(n, hq * d)
        k = self.rms(qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d), L.k_norm).reshape(n, hkv * d)
        return torch.cat([q, k, qkv[:, (hq + hkv) * d:]], 1)

    def rope_write(self, qkv, slots, pos, L, normed: bool = False):
        """Rotate q and k of rows `qkv` at positions `pos`; store k, v at [slots, :, pos]; return q [rows, Hq, D]."""
        n, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if L.q_norm is not None and not normed:
            qkv = self.qk_norm(qkv, L)
        if self.kernels == "triton":
            q = torch.empty((n, hq, d), device=qkv.device, dtype=qkv.dtype)
            kc = L.kc
            self._tk.rope_kv[(n, hq + hkv)](qkv, self.cos, self.sin, slots, pos, q, kc, L.vc,
                                            qkv.stride(0), self.cos.stride(0),
                                            kc.stride(0), kc.stride(1), kc.stride(2),
                                            HQ=hq, HKV=hkv, D=d, DP=max(16, next_pow2(d)), num_warps=1)
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

    def silu_mul(self, gu, fp8: bool = False):
        """SiLU(gate) * up; `fp8`: its rows rounded to E4M3 and their scales, as `add_norm`'s."""
        if self.kernels == "triton":
            rows, i = gu.shape[0], gu.shape[1] // 2
            out = torch.empty((rows, i), device=gu.device, dtype=torch.float8_e4m3fn if fp8 else gu.dtype)
            qs = torch.empty((rows, 1), device=gu.device, dtype=torch.float32) if fp8 else out
            blk = next_pow2(i) if fp8 else 1024  # a row's scale needs the whole row in one program
            self._tk.silu_mul[(rows, cdiv(i, blk))](gu, out, qs, gu.stride(0), out.stride(0), i, BLOCK=blk, FP8=fp8,
                                                    num_warps=(8 if blk >= 4096 else 4) if fp8 else 4, **self._pdl)
            return (out, qs) if fp8 else out
        g, u = gu.chunk(2, -1)
        y = F.silu(g) * u
        return quantize_rows_fp8(y) if fp8 else y

    # -- attention ---------------------------------------------------------------------------
    def attn_prefill_padded(self, q, L, pack):
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

    def attn_prefill_varlen(self, q, L, table, nb: int, out):
        """Causal attention of packed prompts into `out`, one Triton program per (query block, q
        head) from `table` (see `Layout.build`); rows of padding tokens are zeroed."""
        n, hq, d = q.shape
        out.zero_()
        kc = L.kc
        self._tk.prefill_attn[(nb, hq)](
            q, kc, L.vc, table, out, q.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
            self.scale * 1.4426950408889634, HQ=hq, G=self.group, D=d, DP=max(16, next_pow2(d)),
            BLOCK_M=PREFILL_BLOCK, BLOCK_N=64 if d <= 128 else 32, IEEE=q.dtype == torch.float32, num_warps=4)
        return out

    def attn_prompts(self, q, L, p: Prompts, out):
        """Attention of the prompts `p` (their rotated queries `q`) into `out` [tokens, heads x
        head_dim]: varlen (Triton) or on the right-padded batch (SDPA), as their layout says."""
        if p.pack is None:
            return self.attn_prefill_varlen(q, L, p.table, p.blocks, out)
        return out.copy_(self.attn_prefill_padded(q, L, p.pack))

    def splits(self, b: int, span: int | None = None) -> int:
        """The decode attention's splits of each of `b` rows, reading at most `span` positions (None:
        the whole cache)."""
        return decode_attention_config(b, self.num_kv_heads, self.head_dim, span or self.max_seq_len, self.sms,
                                       self.split_min)[0]

    def attn_decode(self, qkv, L, slots, pos, tb, out=None):
        """Decode attention of the step's q/k/v rows `qkv` [b, (Hq + 2 Hkv) x D]: RoPE at `pos`, the
        new key and value written to the cache at [slots, :, pos], the query against [0, pos].
        `tb`: positions any row may read (SDPA: its length bucket; Triton: None, the whole cache, or a
        span short enough to need no split, `TorchEngine._attn_span`)."""
        b, hq, hkv, d, g = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim, self.group
        if L.q_norm is not None:
            qkv = self.qk_norm(qkv, L)
        if self.attention == "triton":  # RoPE and the cache write inside the attention kernel
            span = tb or self.max_seq_len  # as `splits`
            ns, block_n = decode_attention_config(b, hkv, d, span, self.sms, self.split_min)
            chunk = cdiv(cdiv(span, ns), block_n) * block_n
            dp = max(16, next_pow2(d))
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
                CHUNK=chunk, G=g, GP=max(16, next_pow2(g)), D=d, DP=dp, BLOCK_N=block_n,
                IEEE=qkv.dtype == torch.float32, ROPE=True, num_warps=4, **self._pdl)
            if ns > 1:
                self._tk.attn_combine[(b, hq)](acc, mx, lx, out, HQ=hq, NS=ns, D=d, DP=dp, num_warps=1,
                                               **self._pdl)
            return out
        q = self.rope_write(qkv, slots, pos, L, normed=True)
        # gather the batch's slots up to `tb` positions, mask each row past its own length
        k = L.kc[:, :, :tb].index_select(0, slots)  # [b, Hkv, tb, D]
        v = L.vc[:, :, :tb].index_select(0, slots)
        mask = (self._arange[:tb][None, :] <= pos[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(q.view(b, hkv, g, d), k, v, attn_mask=mask, scale=self.scale)
        return o.reshape(b, hq * d) if out is None else out.copy_(o.reshape(b, hq * d))

    # -- forward -----------------------------------------------------------------------------
    def forward(self, tok, attn, last=None):
        """Hidden states after the final norm; `attn(qkv, L)`: a layer's attention output from its
        q/k/v rows (RoPE and the cache write included)."""
        x = F.embedding(tok, self.embed)
        res = None
        for L in self.layers:
            h, res = self.add_norm(x, res, L.in_norm, fp8=self.fp8_input(x, L.wqkv))
            qkv = self.linear(h, L.wqkv, L.bqkv)
            o = self.linear(attn(qkv, L), L.wo, L.bo)
            h, res = self.add_norm(o, res, L.post_norm, fp8=self.fp8_input(o, L.wgu))
            gu = self.linear(h, L.wgu, L.bgu)
            x = self.linear(self.silu_mul(gu, fp8=self.fp8_input(gu, L.wd)), L.wd, L.bd)
        if last is not None:  # prefill: only the last row of each prompt goes on to the head
            x, res = x[last], res[last]
        h, _ = self.add_norm(x, res, self.norm, fp8=self.fp8_input(x, self.lm_head))
        return h

    def decode_logits(self, tok, slots, pos, tb) -> torch.Tensor:
        """Logits [rows, vocab] of a decode step: token `tok[i]` at position `pos[i]` of slot
        `slots[i]`; `tb`: the SDPA attention's length bucket (None with the Triton attention)."""
        h = self.forward(tok, lambda qkv, L: self.attn_decode(qkv, L, slots, pos, tb))
        return self.linear(h, self.lm_head)

    def prefill_logits(self, p: Prompts) -> torch.Tensor:
        """Logits [prompts, vocab] (float32) of a prefill: projections and MLP over the packed
        tokens, attention per prompt."""
        def attn(qkv, L):
            q = self.rope_write(qkv, p.slot_of, p.pos, L)
            out = torch.empty((q.shape[0], q.shape[1] * q.shape[2]), device=q.device, dtype=q.dtype)
            return self.attn_prompts(q, L, p, out)
        h = self.forward(p.tok, attn, last=p.last)
        return self.linear(h, self.lm_head).float()

    def mixed_logits(self, tok, slots, pos, tb, p: Prompts) -> torch.Tensor:
        """Logits [decode rows + prompt capacity, vocab] of a decode step that carries prompts:
        the decode rows (`tok`, `slots`, `pos`) and the prompts' packed tokens (`p`) go through the
        projections and the MLP as one batch (at decode batch sizes the products read the weights
        once for both); attention is the decode kernel for the decode rows and the prompts' causal
        attention for theirs. The head sees every decode row and each prompt's last row."""
        b = tok.shape[0]
        hq, d = self.num_heads, self.head_dim

        def attn(qkv, L):
            out = torch.empty((qkv.shape[0], hq * d), device=qkv.device, dtype=qkv.dtype)
            if b:
                self.attn_decode(qkv[:b], L, slots, pos, tb, out[:b])
            self.attn_prompts(self.rope_write(qkv[b:], p.slot_of, p.pos, L), L, p, out[b:])
            return out
        last = torch.cat([self._arange[:b], p.last + b])
        h = self.forward(torch.cat([tok, p.tok]), attn, last=last)
        return self.linear(h, self.lm_head)

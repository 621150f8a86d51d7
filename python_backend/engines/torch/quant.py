"""8-bit weights for the torch engine: `weights="int8"` (symmetric, one scale per output channel) or
`weights="fp8"` (E4M3, one scale per output channel); activations in the engine's dtype (W8A16).

A decode step at the batch sizes a server runs is bound by reading the weights (docs/gpu-engine.md),
so halving their bytes is what speeds it up; the products stay in bf16/fp16 arithmetic, which keeps
the error to the weights' rounding alone (what the build's accuracy gate measures, `fake_quantize`).
INT8 keeps 8 bits of precision over a row's range, E4M3 3 mantissa bits at every magnitude: on
stories260K the INT8 rounding costs +0.03 % of perplexity and FP8's +2.0 % (docs/quantization.md).
How a product runs:
  * up to MAX_SKINNY_M rows (decode steps, small prefills): the Triton kernel `w8_matmul`
    (kernels.py), every row of the batch in one tile, its configuration tuned once per shape and
    row bucket when the engine loads (`W8Tuner`, before any CUDA graph is captured);
  * more rows (prefills, decode steps carrying prompts), or no Triton (CPU): the weight widened to
    the engine's dtype, then the dense product (cuBLAS on the GPU): compute-bound there, and the
    same numbers as the kernel up to the order of the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import cdiv, next_pow2

E4M3_MAX = 448.0
MAX_SKINNY_M = 128
WEIGHT_FORMATS = ("dtype", "int8", "fp8")


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(8-bit weight [N, K], float32 scale [N]): row n is w[n] / scale[n], scale[n] = max|w[n]| / the
    format's largest value (127 for int8, rounded to nearest; 448 for fp8 E4M3)."""
    if fmt == "fp8":
        return quantize_fp8(w)
    if fmt != "int8":
        raise ValueError(f"unknown weight format {fmt!r} (expected int8 or fp8)")
    wf = w.detach().float()
    scale = (wf.abs().amax(1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight [N, K], float32 scale [N]): row n is w[n] / scale[n], scale[n] = max|w[n]| / 448."""
    wf = w.detach().float()
    scale = (wf.abs().amax(1) / E4M3_MAX).clamp(min=1e-12)
    q = (wf / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


class QuantWeight:
    """A linear layer's weight in 8 bits (`q` [N, K] int8 or float8_e4m3fn, `scale` [N]) and the dtype
    its products return."""

    __slots__ = ("q", "scale", "dtype")

    def __init__(self, w: torch.Tensor, fmt: str, dtype: torch.dtype):
        self.q, self.scale = quantize(w, fmt)
        self.dtype = dtype

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def widened(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.dtype)


def fake_quantize(model, fmt: str) -> int:
    """Round every linear weight of the decoder layers and the LM head through `fmt` (in place, in
    the model's dtype): the numbers the engine's 8-bit products use. Returns how many were rounded.
    The embedding lookup keeps its weights (the engine keeps them in its dtype too)."""
    n = 0
    inner = model.model
    head = model.get_output_embeddings()
    tied = head.weight is inner.embed_tokens.weight
    with torch.no_grad():
        for layer in inner.layers:
            for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                mod.weight.copy_(dequantize(*quantize(mod.weight, fmt), mod.weight.dtype))
                n += 1
        if tied:  # the engine rounds its own copy of the head; the lookup keeps the exact rows
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        head.weight.copy_(dequantize(*quantize(head.weight, fmt), head.weight.dtype))
        n += 1
    return n


class W8Matmul:
    """Products with 8-bit weights: `__call__(x, w, bias)`; the Triton kernel where it runs (see the
    module docstring), with a configuration per (row bucket, N, K) from `tune` or `default_config`."""

    def __init__(self, tk, sms: int):
        self._tk = tk
        self.sms = sms
        self.configs: dict[tuple[int, int, int], dict] = {}

    def __call__(self, x: torch.Tensor, w: QuantWeight, bias=None) -> torch.Tensor:
        m = x.shape[0]
        if self._tk is None or m > MAX_SKINNY_M or m == 0:
            return F.linear(x, w.widened(), bias)
        n, k = w.q.shape
        bm = max(16, next_pow2(m))
        cfg = self.configs.get((bm, n, k)) or default_config(bm, n, k, self.sms)
        y = self.launch(x, w, cfg)
        return y if bias is None else y + bias

    def launch(self, x: torch.Tensor, w: QuantWeight, cfg: dict) -> torch.Tensor:
        m, k = x.shape
        n = w.q.shape[0]
        bm = max(16, next_pow2(m))
        bn, bk, split = cfg["BN"], cfg["BK"], cfg["SPLIT"]
        ks = cdiv(cdiv(k, split), bk) * bk
        y = torch.empty((m, n), device=x.device, dtype=x.dtype) if split == 1 else \
            torch.zeros((m, n), device=x.device, dtype=torch.float32)
        self._tk.w8_matmul[(cdiv(n, bn), split, cdiv(m, bm))](
            x, w.q, w.scale, y, m, n, k, ks, x.stride(0), w.q.stride(0), y.stride(0), BM=bm, BN=bn, BK=bk,
            ATOMIC=split > 1, IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        return y if split == 1 else y.to(x.dtype)

    def tune(self, weights: list[QuantWeight], buckets: list[int], reps: int = 20) -> dict:
        """Time every candidate configuration for each distinct weight shape and row bucket (CUDA
        events, the median of `reps`), keep the fastest. Call before capturing CUDA graphs."""
        if self._tk is None or not weights or weights[0].q.device.type != "cuda":
            return self.configs
        shapes = {}
        for w in weights:
            shapes.setdefault(tuple(w.q.shape), w)
        for (n, k), w in shapes.items():
            for bm in sorted({max(16, next_pow2(b)) for b in buckets if 0 < b <= MAX_SKINNY_M}):
                x = torch.randn((bm, k), device=w.q.device, dtype=w.dtype)
                best = None
                for cfg in candidate_configs(bm, n, k, self.sms):
                    try:
                        ms = cuda_median_ms(lambda: self.launch(x, w, cfg), reps)
                    except Exception:  # noqa: BLE001 - e.g. out of shared memory for this tile
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is not None:
                    self.configs[(bm, n, k)] = best[1]
        return self.configs


def _split(n: int, k: int, bn: int, bk: int, sms: int) -> int:
    split = 1
    while cdiv(n, bn) * split < sms and k // (split * 2) >= bk:
        split *= 2
    return split


def default_config(bm: int, n: int, k: int, sms: int) -> dict:
    bn = 32 if bm >= 64 else 64
    return dict(BN=bn, BK=128, SPLIT=_split(n, k, bn, 128, sms), num_warps=4, num_stages=4)


def candidate_configs(bm: int, n: int, k: int, sms: int) -> list[dict]:
    """A few configurations around the default. Each distinct tile is one Triton compile when the
    engine loads (shared by every shape: K is not a compile-time constant), at most 12 per row bucket."""
    out = []
    for bn in (16, 32, 64):
        for bk in (128, 256):
            if bm * bk > 128 * 128:  # the row tile must fit in shared memory beside the weights
                continue
            for split in sorted({1, _split(n, k, bn, bk, sms)}):
                out.append(dict(BN=bn, BK=bk, SPLIT=split, num_warps=4, num_stages=4))
    return out


def cuda_median_ms(fn, reps: int, warm: int = 1) -> float:
    """Median device time of `fn()` in ms (CUDA events around each call) over `reps` calls (the
    benchmarks use it too: benchmarks/common.py)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]

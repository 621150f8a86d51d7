#!/usr/bin/env python3
"""Decode attention configurations on the GPU: the executor's split-K Triton kernel
(`attn_split_kernel`, + `attn_combine_kernel` when split) at the issue's shape (32 q heads, 4 KV
heads, head dim 64, bf16 cache of 128 slots x 512 positions), timed as CUDA graphs of 22 launches
(one per layer, each on its own layer's cache, as inside a decode step: 22 layers of K/V do not fit
the L2, one does) and checked against torch SDPA.

    python3 benchmarks/gpu_attn.py [--batches 16,64,128] [--contexts 128,256]

Prints, per (batch, context), the microseconds per launch of every (BLOCK_N, warps, stages, splits)
configuration, fastest first, beside the bytes of K/V it reads at the card's ~3.0 TB/s.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_executor_gpu import cuda_median_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    from tritonchat.python_backend.engines.torch.engine import (_next_pow2, _triton_kernels, decode_attention_config,
                                                        triton_cdiv)
except ImportError:
    from python_backend.engine_torch import _next_pow2, _triton_kernels, decode_attention_config, triton_cdiv

HQ, HKV, D, SLOTS, LAYERS = 32, 4, 64, 128, 22
CTX_MAX = 512  # the cache's positions per slot (--max-seq-len)


def launch(tk, q, kc, vc, slots, pos, out, scratch, ns: int, block_n: int, warps: int, stages: int):
    b, g = q.shape[0], HQ // HKV
    chunk = triton_cdiv(triton_cdiv(CTX_MAX, ns), block_n) * block_n
    acc, mx, lx = scratch if ns > 1 else (out, out, out)
    tk.attn_split[(b, HKV, ns)](
        q, kc, vc, slots, pos, acc, mx, lx, out, out, out, 0, 0, kc.stride(0), kc.stride(1), kc.stride(2),
        D ** -0.5 * 1.4426950408889634, HQ=HQ, HKV=HKV, NS=ns, CHUNK=chunk, G=g, GP=max(16, _next_pow2(g)),
        D=D, DP=D, BLOCK_N=block_n, IEEE=False, ROPE=False, num_warps=warps, num_stages=stages)
    if ns > 1:
        tk.attn_combine[(b, HQ)](acc, mx, lx, out, HQ=HQ, NS=ns, D=D, DP=D, num_warps=1)


def reference(q, kc, vc, slots, pos):
    b = q.shape[0]
    n = int(pos.max()) + 1
    k = kc[slots, :, :n].float()
    v = vc[slots, :, :n].float()
    mask = (torch.arange(n, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.float().view(b, HKV, HQ // HKV, D), k, v, attn_mask=mask, scale=D ** -0.5)
    return o.reshape(b, HQ * D)


def graph_us(body, reps: int = 20) -> float:
    """Microseconds per layer of `body()` (LAYERS layers' worth of launches) replayed as one CUDA graph
    (median of `reps`); `body` runs once on a side stream first (compilation, workspaces)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return cuda_median_ms(g.replay, reps) * 1e3 / LAYERS

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--contexts", default="128,256")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--max-seq-len", type=int, default=CTX_MAX)
    args = ap.parse_args()
    globals()["CTX_MAX"] = args.max_seq_len
    tk = _triton_kernels()
    if tk is None or not torch.cuda.is_available():
        sys.exit("needs CUDA and Triton")
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    kcs = [torch.randn(SLOTS, HKV, CTX_MAX, D, device=dev, dtype=dt) for _ in range(LAYERS)]
    vcs = [torch.randn(SLOTS, HKV, CTX_MAX, D, device=dev, dtype=dt) for _ in range(LAYERS)]
    grid = list(itertools.product((64, 128), (2, 4), (1, 2, 3), (1, 2, 4, 8)))
    for b in (int(x) for x in args.batches.split(",")):
        q = torch.randn(b, HQ, D, device=dev, dtype=dt)
        slots = torch.arange(b, device=dev, dtype=torch.int64)
        out = torch.empty(b, HQ * D, device=dev, dtype=dt)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        shipped_ns, shipped_bn = decode_attention_config(b, HKV, D, CTX_MAX, sms)
        most = max(8, shipped_ns)
        scratch = (torch.empty(b, HQ, most, D, device=dev, dtype=torch.float32),
                   torch.empty(b, HQ, most, device=dev, dtype=torch.float32),
                   torch.empty(b, HQ, most, device=dev, dtype=torch.float32))
        shipped = (shipped_bn, 4, 3, shipped_ns)  # the executor's choice (4 warps, Triton's default 3 stages)
        configs = grid + ([shipped] if shipped not in grid else [])
        for ctx in (int(x) for x in args.contexts.split(",")):
            pos = torch.full((b,), ctx - 1, device=dev, dtype=torch.int64)
            ref = reference(q, kcs[0], vcs[0], slots, pos)
            rows = []
            for block_n, warps, stages, ns in configs:
                def fn(layer, cfg=(ns, block_n, warps, stages)):
                    launch(tk, q, kcs[layer], vcs[layer], slots, pos, out, scratch, *cfg)
                try:
                    fn(0)
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a configuration Triton cannot build
                    rows.append((float("inf"), (block_n, warps, stages, ns), f"failed: {str(exc)[:60]}"))
                    continue
                err = (out.float() - ref).abs().max().item()
                rows.append((graph_us(lambda: [fn(layer) for layer in range(LAYERS)]), (block_n, warps, stages, ns), f"max |diff| {err:.1e}"))
            kv_mb = b * HKV * ctx * D * 2 * 2 / 1e6
            base = next(r for r in rows if r[1] == shipped)
            print(f"batch {b}, context {ctx}: K/V {kv_mb:.1f} MB a layer = {kv_mb / 3.0:.1f} us at 3.0 TB/s; "
                  f"shipped config (BLOCK_N {shipped_bn}, 4 warps, 3 stages, {shipped_ns} splits): {base[0]:.2f} us "
                  f"{base[2]}", flush=True)
            for us, cfg, note in sorted(rows)[: args.top]:
                print(f"  {us:7.2f} us  BLOCK_N {cfg[0]:3d} warps {cfg[1]} stages {cfg[2]} splits {cfg[3]}  {note}")


if __name__ == "__main__":
    main()

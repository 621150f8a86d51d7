#!/usr/bin/env python3
"""Decode attention configurations on the GPU: the engine's split-K Triton kernel
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

import torch
import torch.nn.functional as F
from common import D, HKV, HQ, LAYERS, SLOTS, graph_us, launch

from tritonchat.python_backend.engines.torch.kernels import decode_attention_config, load_kernels

CTX_MAX = 512  # the cache's positions per slot (default of --max-seq-len)


def reference(q, kc, vc, slots, pos):
    b = q.shape[0]
    n = int(pos.max()) + 1
    k = kc[slots, :, :n].float()
    v = vc[slots, :, :n].float()
    mask = (torch.arange(n, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.float().view(b, HKV, HQ // HKV, D), k, v, attn_mask=mask, scale=D ** -0.5)
    return o.reshape(b, HQ * D)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--contexts", default="128,256")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--max-seq-len", type=int, default=CTX_MAX)
    args = ap.parse_args()
    ctx_max = args.max_seq_len
    tk = load_kernels()
    if tk is None or not torch.cuda.is_available():
        sys.exit("needs CUDA and Triton")
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    kcs = [torch.randn(SLOTS, HKV, ctx_max, D, device=dev, dtype=dt) for _ in range(LAYERS)]
    vcs = [torch.randn(SLOTS, HKV, ctx_max, D, device=dev, dtype=dt) for _ in range(LAYERS)]
    grid = list(itertools.product((64, 128), (2, 4), (1, 2, 3), (1, 2, 4, 8)))
    for b in (int(x) for x in args.batches.split(",")):
        q = torch.randn(b, HQ, D, device=dev, dtype=dt)
        slots = torch.arange(b, device=dev, dtype=torch.int64)
        out = torch.empty(b, HQ * D, device=dev, dtype=dt)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        shipped_ns, shipped_bn = decode_attention_config(b, HKV, D, ctx_max, sms)
        most = max(8, shipped_ns)
        scratch = (torch.empty(b, HQ, most, D, device=dev, dtype=torch.float32),
                   torch.empty(b, HQ, most, device=dev, dtype=torch.float32),
                   torch.empty(b, HQ, most, device=dev, dtype=torch.float32))
        shipped = (shipped_bn, 4, 3, shipped_ns)  # the engine's choice (4 warps, Triton's default 3 stages)
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

#!/usr/bin/env python3
"""Would the decode step's narrow products go faster with their weights already in L2?

The issue's shape at batch 64: the o product [64 x 2048] x [2048 x 2048] (8.4 MB of bf16 weights,
2.8 us at 3.0 TB/s), timed as CUDA graphs over 22 layers (each with its own weights), its weights
cold (other data read in between) and warm (read just before: in L2), beside the attention that runs
before it in a step. If warm were much faster than cold, reading the next product's weights into L2
on a side stream while the attention runs would pay; it is not (H100: 6.8 vs 5.5 us): a product this
small is bound by what every kernel costs, not by reading its weights.

    python3 benchmarks/gpu_l2.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import HKV, HQ, D, LAYERS, SLOTS, graph_us, launch

from tritonchat.python_backend.engines.torch.kernels import load_kernels

B, CTX, HIDDEN = 64, 192, 2048


def touch_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def touch(X, OUT, N, BLOCK: tl.constexpr):
        # read X once (into L2), write nothing unless a sum is NaN
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(pid * BLOCK, N, step):
            o = i + tl.arange(0, BLOCK)
            acc += tl.load(X + o, mask=o < N, other=0.0, eviction_policy="evict_last").to(tl.float32)
        s = tl.sum(acc, 0)
        if s != s:
            tl.store(OUT + pid, s)

    return touch


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    tk = load_kernels()
    touch = touch_kernel()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    wo = [torch.randn(HIDDEN, HQ * D, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)]
    flush = [torch.randn(HIDDEN, HQ * D, device=dev, dtype=dt) for _ in range(LAYERS)]
    kcs = [torch.randn(SLOTS, HKV, 512, D, device=dev, dtype=dt) for _ in range(LAYERS)]
    vcs = [torch.randn(SLOTS, HKV, 512, D, device=dev, dtype=dt) for _ in range(LAYERS)]
    q = torch.randn(B, HQ, D, device=dev, dtype=dt)
    slots = torch.arange(B, device=dev)
    pos = torch.full((B,), CTX - 1, device=dev, dtype=torch.int64)
    att = torch.empty(B, HQ * D, device=dev, dtype=dt)
    sink = torch.zeros(1024, device=dev, dtype=torch.float32)
    mb = wo[0].numel() * 2 / 1e6

    def attention(layer):
        launch(tk, q, kcs[layer], vcs[layer], slots, pos, att, None, 1, 64, 4, 3)

    def cold():
        for layer in range(LAYERS):
            touch[(132,)](flush[layer], sink, flush[layer].numel(), BLOCK=1024)
            F.linear(att, wo[layer])

    def warm():
        for layer in range(LAYERS):
            touch[(132,)](wo[layer], sink, wo[layer].numel(), BLOCK=1024)
            F.linear(att, wo[layer])

    def touch_only(w):
        def body():
            for layer in range(LAYERS):
                touch[(132,)](w[layer], sink, w[layer].numel(), BLOCK=1024)
        return body

    t_flush = graph_us(touch_only(flush))
    print(f"o product [{B} x {HQ * D}] x [{HQ * D} x {HIDDEN}] ({mb:.1f} MB of weights), us per layer:")
    print(f"  cold (after reading {mb:.1f} MB of other data): {graph_us(cold) - t_flush:6.2f}")
    print(f"  warm (its weights read just before):            {graph_us(warm) - graph_us(touch_only(wo)):6.2f}")

    def plain():
        for layer in range(LAYERS):
            attention(layer)
            F.linear(att, wo[layer])

    print(f"attention (batch {B}, context {CTX}) alone:       {graph_us(lambda: [attention(i) for i in range(LAYERS)]):6.2f}")
    print(f"attention then the o product:                   {graph_us(plain):6.2f}")


if __name__ == "__main__":
    main()

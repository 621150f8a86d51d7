#!/usr/bin/env python3
"""The decode step's matrix products at small batch: cuBLAS against a skinny Triton kernel.

A decode step of the TinyLlama-shaped model reads ~2.07 GB of bf16 weights through five products
(q/k/v fused, o, gate/up fused, down per layer; the head). Measured on an H100 (2026-11-22): the card
reads at ~3.0 TB/s (copies at 2.4); cuBLAS reaches 2.3-2.4 TB/s on gate/up and the head but 1.1-1.7 on
the narrow q/k/v, o and down products (one step's products 1.12 ms at batch 64), and this simple
Triton kernel is slower everywhere but the head (1.26 ms at its best configurations): the engine
keeps cuBLAS. This times, for each shape and batch M, the 22 products
of a step (22 weight copies, so no run reads from L2) as one CUDA-graph replay:

  cublas     F.linear as the engine calls it now
  cublaslt   the same with torch.backends.cuda.preferred_blas_library("cublaslt")
  triton     `skinny_matmul` below (the engine's w8_matmul kernel on bf16 weights, a scale of ones: all
             rows in one tile, split-K with fp32 atomics where N is narrow) at each of its configurations

and prints GB/s per variant, the best Triton configuration per shape, and the error of each against
a float32 product.

    python3 benchmarks/gpu_gemm.py [--m 1,16,64,128]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import cuda_median_ms

from tritonchat.python_backend.engines.torch.kernels import load_kernels


def _kernel():
    # the engine's 8-bit product kernel (kernels.py, w8_matmul) runs bf16 weights too: widening them is
    # a no-op, and with a scale of ones it is the plain skinny product (every row in one tile, split-K
    # with fp32 atomics where N is narrow) this benchmark measured before the engine had it
    return load_kernels().w8_matmul


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(n: int, k: int, bn: int, bk: int) -> int:
    split, sms = 1, torch.cuda.get_device_properties(0).multi_processor_count
    while _cdiv(n, bn) * split < sms and k // (split * 2) >= bk:
        split *= 2
    return split


def skinny_default(m: int, n: int, k: int) -> dict:
    return dict(BN=64, BK=128, SPLIT=_split(n, k, 64, 128), num_warps=4, num_stages=4)


def skinny_configs(m: int, n: int, k: int) -> list[dict]:
    out = []
    for bn in (32, 64, 128):
        for bk in (128, 256):
            s0 = _split(n, k, bn, bk)
            for split in sorted({s0, s0 * 2}):
                for stages in (3, 4, 6):
                    out.append(dict(BN=bn, BK=bk, SPLIT=split, num_warps=4, num_stages=stages))
    return out


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    cfg = dict(config or skinny_default(m, n, k))
    bn, bk, split = cfg.pop("BN"), cfg.pop("BK"), cfg.pop("SPLIT")
    ks = _cdiv(_cdiv(k, split), bk) * bk
    y = torch.empty((m, n), device=x.device, dtype=x.dtype) if split == 1 else \
        torch.zeros((m, n), device=x.device, dtype=torch.float32)
    ones = _ones(n, x.device)
    _kernel()[(_cdiv(n, bn), split, 1)](x, w, ones, y, m, n, k, ks, x.stride(0), w.stride(0), y.stride(0),
                                        BM=max(16, 1 << (m - 1).bit_length()), BN=bn, BK=bk, ATOMIC=split > 1,
                                        IEEE=False, **cfg)
    return y if split == 1 else y.to(x.dtype)


_ONES: dict = {}


def _ones(n: int, device) -> torch.Tensor:
    if n not in _ONES:
        _ONES[n] = torch.ones(n, device=device, dtype=torch.float32)
    return _ONES[n]


SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
          "head": (32000, 2048)}
LAYERS = 22


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of one replay of `fn` captured as a CUDA graph (no launch gaps between its kernels)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
        s.synchronize()
        g = torch.cuda.CUDAGraph()
        g.capture_begin()
        fn()
        g.capture_end()
    torch.cuda.current_stream().wait_stream(s)
    return cuda_median_ms(g.replay, reps)


def copy_bandwidth() -> float:
    x = torch.empty(2 ** 29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = graph_ms(lambda: y.copy_(x))
    read = graph_ms(lambda: x.sum())
    return 2 * x.numel() * 2 / ms / 1e6, x.numel() * 2 / read / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,16,64,128")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  copy / read "
          "{:.0f} / {:.0f} GB/s".format(*copy_bandwidth()))
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        layers = 1 if name == "head" else LAYERS
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        nbytes = layers * n * k * 2
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ ws[0].float().t())
            out = {}
            torch.backends.cuda.preferred_blas_library("cublas")
            out["cublas"] = graph_ms(lambda: [F.linear(x, w) for w in ws])
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                out["cublaslt"] = graph_ms(lambda: [F.linear(x, w) for w in ws])
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            best, best_cfg, errs = None, None, []
            for cfg in skinny_configs(m, n, k):
                try:
                    y = skinny_matmul(x, ws[0], config=cfg)
                except Exception as exc:  # noqa: BLE001 - e.g. OutOfResources (shared memory)
                    print(f"  {name} m={m} {cfg}: {type(exc).__name__}")
                    continue
                err = ((y.float() - ref).norm() / ref.norm()).item()
                errs.append(err)
                if not err < 1e-2:
                    print(f"  {name} m={m} {cfg}: rel err {err:.2e} WRONG")
                    continue
                ms = graph_ms(lambda: [skinny_matmul(x, w, config=cfg) for w in ws])
                if best is None or ms < best:
                    best, best_cfg = ms, cfg
            auto = skinny_matmul(x, ws[0])
            auto_err = ((auto.float() - ref).norm() / ref.norm()).item()
            out["triton"] = graph_ms(lambda: [skinny_matmul(x, w) for w in ws])
            lin_err = ((F.linear(x, ws[0]).float() - ref).norm() / ref.norm()).item()
            rows.append((name, m, out["cublas"], out["cublaslt"], out["triton"], best, best_cfg, nbytes,
                         lin_err, auto_err))
            print(f"{name:8s} m={m:4d} cublas {out['cublas']:.3f} ms ({nbytes / out['cublas'] / 1e6:.0f} GB/s)"
                  f"  cublaslt {out['cublaslt']:.3f}  triton(default) {out['triton']:.3f}"
                  f"  triton(best) {best:.3f} {best_cfg}  err cublas {lin_err:.1e} triton {auto_err:.1e}",
                  flush=True)
    print("\n| shape | M | cuBLAS ms (GB/s) | cuBLASLt ms | Triton default ms (GB/s) | best config ms | best config |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, m, cb, lt, tr, best, cfg, nbytes, _, _ in rows:
        print(f"| {name} | {m} | {cb:.3f} ({nbytes / cb / 1e6:.0f}) | {lt:.3f} | {tr:.3f} ({nbytes / tr / 1e6:.0f}) "
              f"| {best:.3f} | {cfg} |")
    for m in sorted({r[1] for r in rows}):
        sel = [r for r in rows if r[1] == m]
        print(f"M={m}: step products cuBLAS {sum(r[2] for r in sel):.3f} ms, Triton default "
              f"{sum(r[4] for r in sel):.3f} ms, Triton best {sum(r[5] for r in sel):.3f} ms")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The decode step's matrix products at small batch: cuBLAS on bf16 weights against the engine's
8-bit kernel (`w8_matmul`, python_backend/engines/torch/matmul.py) on INT8 and FP8 weights.

A decode step of the TinyLlama-shaped model reads ~2.07 GB of bf16 weights through five products
(q/k/v fused, o, gate/up fused, down per layer; the head). Each product here is timed as the 22 of a
step (22 weight copies, so no run reads from L2), replayed as one CUDA graph: for each shape and
batch M, cuBLAS bf16, then every candidate configuration of the 8-bit kernel, grouped by form —
one row on the CUDA cores (`gemv`), `tl.dot` with the rows as the MMA's M (`dot`) or the weight
(`dot-t`); whole K (`k1`) or split-K fixed up in the launch (`kN`). Prints GB/s of the weight
bytes, the error against a float32 product of the widened weights, and per M the sum over a step's
products. FP8 also as W8A8 where the GPU can (`fp8 W8A8`: the rows rounded to E4M3 by the `fp8_rows`
kernel, then `torch._scaled_mm`; its error against the rounded rows' float32 product).

    python3 benchmarks/gpu_gemm.py [--m 1,16,64] [--formats fp8,int8] [--a8-kernel] [--tma]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from tritonchat.python_backend.engines.torch.kernels import load_kernels
from tritonchat.python_backend.engines.torch.matmul import FORMS, W8Matmul, candidate_configs, form_of, \
    graph_median_ms, row_bucket
from tritonchat.python_backend.engines.torch.quant import DenseWeight, QuantWeight, quantize_rows_fp8, w8a8_supported

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
          "head": (32000, 2048)}
LAYERS = 22


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of one replay of `fn` captured as a CUDA graph (no launch gaps between its kernels)."""
    return graph_median_ms(fn, reps, launches=1)


def copy_bandwidth() -> tuple[float, float]:
    x = torch.empty(2 ** 29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = graph_ms(lambda: y.copy_(x))
    read = graph_ms(lambda: x.sum())
    return 2 * x.numel() * 2 / ms / 1e6, x.numel() * 2 / read / 1e6


def form(cfg: dict, m: int) -> str:
    return (FORMS[form_of(cfg, m)] + ("/ws" if cfg.get("WS") else "") + f"/k{cfg['SPLIT']}"
            + ("/pdl" if cfg.get("PDL") else ""))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def best_by_form(mm, configs, run, qs, ref, m: int, label: str) -> dict:
    """{form: (ms, config, rel. error)}: the fastest correct configuration of each form, `run(q, cfg)`
    timed over every weight copy in `qs` as one graph (all compiled first, in parallel, as the
    engine's tuner does: `W8Matmul.precompile`); failures and wrong results printed."""
    best: dict = {}
    mm.precompile([(partial(run, qs[0]), cfg) for cfg in configs])
    for cfg in configs:
        try:
            err = rel_err(run(qs[0], cfg), ref)
            t = graph_ms(lambda: [run(q, cfg) for q in qs])
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile
            print(f"  {label} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if not err < 2e-2:
            print(f"  {label} {cfg}: rel err {err:.2e} WRONG")
            continue
        f = form(cfg, m)
        if f not in best or t < best[f][0]:
            best[f] = (t, cfg, err)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,16,64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--formats", default="fp8,int8", help="fp8, int8, and dtype: the 8-bit kernel over the "
                    "bf16 weights themselves (empty: the bf16 products alone)")
    ap.add_argument("--pdl", action="store_true", help="8-bit configurations also with programmatic dependent "
                    "launch (each of the 22 starts while the one before ends)")
    ap.add_argument("--tma", action="store_true", help="from 16 rows also the kernel's TMA form (`dot-tma`; "
                    "over the bf16 weights too, against cuBLAS; at 64 rows also warp-specialised, `dot-tma/ws`)")
    ap.add_argument("--blas", default="cublas", help="comma list of torch's BLAS libraries to time the bf16 "
                    "products on (cublas, cublaslt: torch.backends.cuda.preferred_blas_library)")
    ap.add_argument("--a8-kernel", action="store_true", help="FP8 W8A8 also on the kernel's FP8 form (`dot-a8`: "
                    "the rounded rows by the FP8 weights, every candidate)")
    args = ap.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {sms} SMs  copy / read "
          "{:.0f} / {:.0f} GB/s".format(*copy_bandwidth()), flush=True)
    w8a8 = w8a8_supported(torch.device("cuda"), torch.bfloat16)
    mm = W8Matmul(load_kernels(), sms, pdl=args.pdl)
    total: dict = {}
    print("| shape | M | weights | ms | GB/s | config | rel. err |\n|---|---:|---|---:|---:|---|---:|")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        layers = 1 if name == "head" else LAYERS
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for i, lib in enumerate(args.blas.split(",")):
                torch.backends.cuda.preferred_blas_library(lib)
                ms = graph_ms(lambda: [F.linear(x, w) for w in ws])
                err = rel_err(F.linear(x, ws[0]), x.float() @ ws[0].float().t())
                label = "bf16" if i == 0 else f"bf16 {lib}"
                total.setdefault((m, label), 0.0)
                total[(m, label)] += ms
                print(f"| {name} | {m} | bf16 {lib} | {ms:.3f} | {layers * n * k * 2 / ms / 1e6:.0f} | | {err:.1e} |",
                      flush=True)
            torch.backends.cuda.preferred_blas_library(args.blas.split(",")[0])
            for fmt in filter(None, args.formats.split(",")):
                qs = [DenseWeight(w) if fmt == "dtype" else QuantWeight(w, fmt, torch.bfloat16) for w in ws]
                nbytes = layers * n * k * qs[0].q.element_size()
                ref = x.float() @ qs[0].widened().float().t()
                best = best_by_form(mm, candidate_configs(row_bucket(m), n, k, sms, pdl=args.pdl, fmt=qs[0].fmt,
                                                      tma=args.tma),
                                    partial(mm.launch, x), qs, ref, m, f"{name} m={m} {fmt}")
                for f, (t, cfg, err) in sorted(best.items(), key=lambda kv: kv[1][0]):
                    print(f"| {name} | {m} | {fmt} {f} | {t:.3f} | {nbytes / t / 1e6:.0f} | {cfg} | {err:.1e} |",
                          flush=True)
                if best:
                    t, cfg, _ = min(best.values(), key=lambda v: v[0])
                    total.setdefault((m, fmt), 0.0)
                    total[(m, fmt)] += t
                if fmt == "fp8" and w8a8:  # W8A8: the rows rounded (one kernel), then FP8 tensor cores
                    ref8 = (lambda q, s: (q.float() * s) @ qs[0].widened().float().t())(*quantize_rows_fp8(x))
                    err = rel_err(mm.scaled(x, qs[0]), ref8)
                    t = graph_ms(lambda: [mm.scaled(x, q) for q in qs])
                    xq, sx = mm.quantize_rows(x)
                    t_mm = graph_ms(lambda: [torch._scaled_mm(xq, q.q.t(), scale_a=sx, scale_b=q.scale.view(1, -1),
                                                              out_dtype=torch.bfloat16) for q in qs])
                    print(f"| {name} | {m} | fp8 W8A8 | {t:.3f} | {nbytes / t / 1e6:.0f} | _scaled_mm alone "
                          f"{t_mm:.3f} | {err:.1e} |", flush=True)
                    total.setdefault((m, "fp8 W8A8"), 0.0)
                    total[(m, "fp8 W8A8")] += t
                    t_round = t - t_mm  # the rows' rounding, which both W8A8 forms need
                    best8 = best_by_form(mm, candidate_configs(row_bucket(m), n, k, sms, pdl=args.pdl, fmt="fp8",
                                                               a8=True)
                                         if args.a8_kernel else [], partial(mm.launch, xq, sx=sx), qs, ref8,
                                         m, f"{name} m={m} dot-a8")
                    if best8:  # the product alone, as `_scaled_mm alone` above; the total adds the rounding
                        t, cfg, err = min(best8.values(), key=lambda v: v[0])
                        print(f"| {name} | {m} | fp8 W8A8 kernel {form(cfg, m)} | {t:.3f} | {nbytes / t / 1e6:.0f} "
                              f"| {cfg} | {err:.1e} |", flush=True)
                        total.setdefault((m, "fp8 W8A8 kernel"), 0.0)
                        total[(m, "fp8 W8A8 kernel")] += t + t_round
                del qs
    print()
    for (m, fmt), t in sorted(total.items()):
        print(f"M={m} {fmt}: a step's products {t:.3f} ms"
              + (f" ({t / total[(m, 'bf16')]:.2f}x bf16)" if fmt != "bf16" else ""))


if __name__ == "__main__":
    main()

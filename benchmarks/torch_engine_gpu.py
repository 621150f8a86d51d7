#!/usr/bin/env python3
"""TorchEngine on a GPU: correctness against transformers and decode/prefill timings.

Builds a seeded random-init Llama with TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads,
4 KV heads, intermediate 5632, vocab 32000) directly on the GPU in bf16 (no files), then
  1. checks the engine against HF: prefill logits (bf16 and an fp32 reference) and greedy tokens
     over a batch of 4 prompts of different lengths, for each kernel/attention/graph variant;
  2. times one decode step at batch 1, 16, 64, 128 (context 128) with and without CUDA graphs,
     prefill of 128 tokens, and HF `generate` (bf16, DynamicCache) at batch 1 and 64;
  3. prints a table with the memory-bandwidth bound (weights [+ KV read] / measured copy bandwidth).

Run from the repository root, the package installed (see benchmarks/common.py):
    PYTHONUNBUFFERED=1 python3 benchmarks/torch_engine_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from common import build_model, cuda_median_ms, log, wall_median_ms

from tritonchat.python_backend.engines.torch import TorchEngine
from tritonchat.python_backend.engines.torch.matmul import TUNE_ROWS

CTX = 128  # context length the decode timings run at
MAX_SEQ = 1024
MAX_SLOTS = 128
BATCHES = (1, 16, 32, 64, 128)
VARIANTS = {
    # name: (kernels, attention, cuda_graphs, length_bucket)
    "triton+graphs": ("triton", "triton", True, 256),
    "triton eager": ("triton", "triton", False, 256),
    "torch-sdpa+graphs": ("torch", "sdpa", True, 256),
    "torch-sdpa+graphs T=1024": ("torch", "sdpa", True, MAX_SEQ),
    "torch-sdpa eager": ("torch", "sdpa", False, 256),
    # the products' weights in 8 bits (python_backend/engines/torch/quant.py); timed, not in the HF check
    "triton+graphs int8": ("triton", "triton", True, 256, {"weights": "int8"}),
    "triton+graphs fp8": ("triton", "triton", True, 256, {"weights": "fp8"}),
    # the same without programmatic dependent launch (on by default where it runs: kernels.py)
    "triton+graphs nopdl": ("triton", "triton", True, 256, {"pdl": False}),
    "triton+graphs int8 nopdl": ("triton", "triton", True, 256, {"weights": "int8", "pdl": False}),
    "triton+graphs fp8 nopdl": ("triton", "triton", True, 256, {"weights": "fp8", "pdl": False}),
    # FP8 products: W8A8 above matmul.W8A8_ROWS rows is the default where the GPU can ("fp8"); W8A16
    # at every batch (models.generator.w8a8: false), W8A8 at every batch
    "triton+graphs fp8 w8a16": ("triton", "triton", True, 256, {"weights": "fp8", "w8a8_rows": None}),
    "triton+graphs fp8 w8a8": ("triton", "triton", True, 256, {"weights": "fp8", "w8a8_rows": 0}),
    # W8A8 products rounding their input with a kernel of their own (not in the norm / SiLU·up before)
    "triton+graphs fp8 unfused": ("triton", "triton", True, 256, {"weights": "fp8", "fuse_fp8": False}),
    # bf16 products on cuBLAS at every row count (by default the 8-bit products' kernel takes the
    # bf16 weights where its tuning timed it faster: quant.DenseWeight)
    "triton+graphs cublas": ("triton", "triton", True, 256, {"dense_kernel": False}),
    # FP8: W8A8 from 33 rows (the 64-row graphs W8A8 too), against the default's more than 64
    "triton+graphs fp8 a8from33": ("triton", "triton", True, 256, {"weights": "fp8", "w8a8_rows": 32}),
    # FP8: the W8A8 products on the kernel's FP8 form where its tuning timed it faster than _scaled_mm
    "triton+graphs fp8 a8kernel": ("triton", "triton", True, 256, {"weights": "fp8", "a8_kernel": True}),
    # FP8: every W8A8 product as W8A8 (before the twenty-second session), not the kernel's W8A16 forms
    # where its tuning timed them faster
    "triton+graphs fp8 a8only": ("triton", "triton", True, 256, {"weights": "fp8", "a16_kernel": False}),
    # the products of 16 rows and more may take the kernel's TMA form where tuned faster (bf16: up to
    # 64 rows, against cuBLAS)
    "triton+graphs tma": ("triton", "triton", True, 256, {"tma_kernel": True}),
    "triton+graphs int8 tma": ("triton", "triton", True, 256, {"weights": "int8", "tma_kernel": True}),
    # the decode attention split for the whole cache every step (by default steps whose sequences all
    # fit in split_min positions take graphs without a split: TorchEngine._attn_span)
    "triton+graphs longspan": ("triton", "triton", True, 256, {"short_span": False}),
    "triton+graphs fp8 longspan": ("triton", "triton", True, 256, {"weights": "fp8", "short_span": False}),
    "triton+graphs fp8 tma": ("triton", "triton", True, 256, {"weights": "fp8", "tma_kernel": True, "a8_kernel": True}),
    # the TMA form (warp-specialised too at 64 rows) among the FP8 W8A16 forms, without the A8 form
    "triton+graphs fp8 tma-w8a16": ("triton", "triton", True, 256, {"weights": "fp8", "tma_kernel": True}),
    # the dense products (bf16 cuBLAS ones, the 8-bit ones' widened weights above MAX_SKINNY_M rows) through
    # cuBLASLt instead of cuBLAS (torch's preferred BLAS library, set while the variant's graphs are captured)
    "triton+graphs cublaslt": ("triton", "triton", True, 256, {"blas": "cublaslt"}),
    "triton+graphs fp8 cublaslt": ("triton", "triton", True, 256, {"weights": "fp8", "blas": "cublaslt"}),
}


def use_blas(variant: str) -> None:
    """torch's preferred BLAS library for `variant` (cuBLAS unless it names another): a process-wide
    setting, read when a product is launched, so a graph keeps the library it was captured with."""
    _, _, _, _, *extra = VARIANTS[variant]
    torch.backends.cuda.preferred_blas_library((extra[0] if extra else {}).get("blas", "cublas"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = cuda_median_ms(lambda: y.copy_(x), 20)
    del x, y
    return 2 * 512 * 2**20 / (ms * 1e-3)


def make_engine(model, variant, **kw):
    kernels, attention, graphs, bucket, *extra = VARIANTS[variant]
    args = dict(model=model, max_slots=MAX_SLOTS, max_seq_len=MAX_SEQ, device="cuda", dtype="bfloat16",
                cuda_graphs=graphs, kernels=kernels, attention=attention, length_bucket=bucket)
    opts = {**(extra[0] if extra else {}), **kw}
    opts.pop("blas", None)
    use_blas(variant)
    fuse = {name: opts.pop(name, True) for name in ("fuse_fp8", "dense_kernel")}
    forms = {name: opts.pop(name, name == "a16_kernel") for name in ("a8_kernel", "tma_kernel", "a16_kernel")}
    short_span = opts.pop("short_span", True)
    ex = TorchEngine(**{**args, **opts})
    ex.short_span = short_span  # before any graph is captured
    if ex.path == "native":
        for name, on in fuse.items():  # before any graph is captured
            setattr(ex.llama, name, on)
        for name, on in forms.items():
            setattr(ex.llama.mm, name, on)
        ex.llama.mm.tune(ex.llama.kernel_weights(), TUNE_ROWS, own_rounding=ex.llama.own_rounding())  # as warmup()
    return ex


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_correctness(model, ref32, res):
    """Prefill + 7 batched greedy decode steps over 4 prompts of different lengths, per variant.

    Every logits row the engine returns is compared (teacher-forced on the engine's own tokens)
    with an fp32 HF forward; HF's own bf16 forward over the same tokens gives the yardstick. The
    greedy tokens are compared with HF `generate` in the same dtype; where they part, the HF top-2
    margin at that step is reported (bf16 near-ties flip). A float32 engine (Triton kernels,
    IEEE dots, CUDA graphs) must match HF fp32 token for token.
    """
    rng = np.random.default_rng(0)
    lens = [37, 64, 100, 128]
    prompts = [rng.integers(3, 32000, n) for n in lens]
    steps = 8
    hf_tok = {}
    with torch.no_grad():
        for name, m in (("bf16", model), ("fp32", ref32)):
            hf_tok[name] = []
            for p in prompts:
                ids = torch.from_numpy(p)[None].cuda()
                g = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=steps, min_new_tokens=steps)
                hf_tok[name].append(g[0, len(p):].tolist())
    cases = [(v, {}) for v in VARIANTS if "T=1024" not in v and len(VARIANTS[v]) == 4] + [("triton+graphs", {"dtype": "float32"})]
    for variant, kw in cases:
        label = variant + (" fp32" if kw else "")
        try:
            ex = make_engine(ref32 if kw else model, variant, **kw)
            ours, rows = [[] for _ in prompts], [[] for _ in prompts]
            for s, p in enumerate(prompts):
                lg = ex.prefill(s, p)
                rows[s].append(lg)
                ours[s].append(int(lg.argmax()))
            slots = np.arange(len(prompts))
            for _ in range(steps - 1):
                lg = ex.decode(slots, np.array([o[-1] for o in ours]))
                for s in slots:
                    rows[s].append(lg[s])
                    ours[s].append(int(lg[s].argmax()))
            rel_ref, rel_hf, margins = [], [], []
            with torch.no_grad():
                for p, o, r in zip(prompts, ours, rows):
                    seq = torch.from_numpy(np.concatenate([p, np.asarray(o[:-1], dtype=np.int64)]))[None].cuda()
                    ref = ref32(seq).logits[0, len(p) - 1:].float().cpu().numpy()
                    hfb = model(seq).logits[0, len(p) - 1:].float().cpu().numpy()
                    r = np.stack(r)
                    rel_ref.append(max(rel(r[i], ref[i]) for i in range(steps)))
                    rel_hf.append(max(rel(hfb[i], ref[i]) for i in range(steps)))
            want = hf_tok["fp32" if kw else "bf16"]
            match = [sum(1 for _ in iter_prefix(o, h)) for o, h in zip(ours, want)]
            with torch.no_grad():
                for p, h, n in zip(prompts, want, match):
                    if n < steps:
                        seq = torch.from_numpy(np.concatenate([p, np.asarray(h[:n], dtype=np.int64)]))[None].cuda()
                        top2 = (ref32 if kw else model)(seq).logits[0, -1].float().topk(2).values
                        margins.append(round(float(top2[0] - top2[1]), 5))
            out = {"rows_rel_vs_fp32": max(rel_ref), "hf_bf16_rows_rel_vs_fp32": max(rel_hf),
                   "greedy_match": f"{sum(match)}/{steps * len(prompts)}", "margin_at_divergence": margins}
            res.setdefault("correctness", {})[label] = out
            log(f"[{label}] all 32 logits rows (prefill + decode) max rel vs fp32 HF {out['rows_rel_vs_fp32']:.2e} "
                f"(HF bf16 on the same tokens: {out['hf_bf16_rows_rel_vs_fp32']:.2e}); greedy = HF generate "
                f"{out['greedy_match']} tokens; HF top-2 margin where they part: {margins}")
            del ex
        except Exception:  # noqa: BLE001
            log(f"[{label}] correctness FAILED\n{traceback.format_exc()}")
            res.setdefault("errors", []).append(f"correctness {label}: {traceback.format_exc()}")
        gc.collect()
        torch.cuda.empty_cache()


def profile_step(model, res, variant="triton+graphs", batches=(1, 64)):
    """Kernel-time breakdown of one graph-captured decode step (torch.profiler over graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    ex = make_engine(model, variant)
    ex._lengths[:] = CTX
    out = res.setdefault("profile", {}).setdefault(variant, {})
    for b in batches:
        slots = np.arange(b, dtype=np.int64)
        toks = np.full(b, 5, dtype=np.int64)
        pos = np.full(b, CTX, dtype=np.int64)
        with torch.no_grad():
            for _ in range(3):
                ex._launch(slots, toks, pos)
            torch.cuda.synchronize()
            reps = 20
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    ex._launch(slots, toks, pos)
                torch.cuda.synchronize()
        groups: dict = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            name = ev.key
            if t <= 0 or name.startswith("cudaGraph") or "Memcpy" in name and "HtoD" not in name:
                continue
            k = ("w8_matmul" if "w8_matmul" in name
                 else "gemm (cuBLAS)" if any(x in name.lower() for x in ("gemm", "gemv", "sm90", "cutlass", "nvjet"))
                 else "attn_split" if "attn_split" in name else "attn_combine" if "attn_combine" in name
                 else "add_rmsnorm" if "rmsnorm" in name else "rope_kv" if "rope" in name
                 else "silu_mul" if "silu" in name else name[:40])
            g = groups.setdefault(k, [0.0, 0])
            g[0] += t / reps / 1e3
            g[1] += ev.count // reps
        out[f"b{b}"] = {k: {"ms": round(v[0], 4), "kernels": v[1]} for k, v in
                        sorted(groups.items(), key=lambda kv: -kv[1][0])}
        tot = sum(v[0] for v in groups.values())
        log(f"[profile {variant} b={b}] kernel time {tot:.3f} ms/step in "
            f"{sum(v[1] for v in groups.values())} kernels: " +
            ", ".join(f"{k} {v[0]:.3f} ms/{v[1]}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])[:8]))
    del ex
    gc.collect()
    torch.cuda.empty_cache()


def iter_prefix(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def bench_prompt() -> np.ndarray:
    """The 128-token context every timing runs on (the same tokens each call)."""
    return np.random.default_rng(1).integers(3, 32000, CTX)


def prepare(model, variant, res):
    """The variant's engine with every slot holding the same 128-token context."""
    ex = make_engine(model, variant)
    out = res.setdefault("timings", {}).setdefault(variant, {})
    out["weight_bytes"] = ex.llama.weight_bytes()  # what a decode step reads of the weights
    out["pdl"] = ex.pdl
    log(f"[{variant}] programmatic dependent launch: {'on' if ex.pdl else 'off'}")
    on_kernel = ex.describe().get("kernel_products")  # bf16 products the tuner gave the kernel: (rows, N, K)
    if on_kernel:
        out["kernel_products"] = on_kernel
        log(f"[{variant}] bf16 products on the kernel: {out['kernel_products']}")
    ex.prefill(0, bench_prompt())
    for L in ex.layers:
        L.kc[:MAX_SLOTS] = L.kc[0]
        L.vc[:MAX_SLOTS] = L.vc[0]
    return ex


def time_round(ex, variant, res, long_ctx=False):
    """One round of the variant's timings; over several rounds (`--rounds`) each figure keeps its
    smallest value, and the step's per-round values are kept too."""
    out = res["timings"][variant]
    use_blas(variant)  # graphs captured in this round (each batch's first step) take the variant's library
    rng = np.random.default_rng(1)
    # prefill 128 tokens (eager for every variant): slot 0 gets the same context again
    prompt = bench_prompt()
    ms = wall_median_ms(lambda: ex.prefill(0, prompt), 10)
    out["prefill128_ms"] = min(ms, out.get("prefill128_ms", ms))
    ctx = 896 if long_ctx else CTX  # context 896: pretend the first 896 positions are filled
    ex._lengths[:] = ctx
    graphs = ex.cuda_graphs
    for b in BATCHES if not long_ctx else (64,):
        slots = np.arange(b, dtype=np.int64)
        toks = rng.integers(3, 32000, b)
        pos = np.full(b, ctx, dtype=np.int64)
        reps = 200 if graphs else 30
        with torch.no_grad():
            step = cuda_median_ms(lambda: ex._launch(slots, toks, pos), reps)

        def call():
            ex.decode(slots, toks)
            ex._lengths[slots] = ctx

        wall = wall_median_ms(call, reps // 2)
        key = f"b{b}" + ("_ctx896" if long_ctx else "")
        old = out.get(key, {"step_ms": step, "call_ms": wall, "rounds": []})
        out[key] = {"step_ms": min(step, old["step_ms"]), "call_ms": min(wall, old["call_ms"]),
                    "rounds": old["rounds"] + [step]}
        log(f"[{variant}] batch {b:3d} ctx {ctx}: step {step:.3f} ms (device), decode() {wall:.3f} ms (wall)")


def time_variants(model, variants, res, rounds, save):
    """Each variant's step in `rounds` rounds, alternately in the given and the reverse order, the
    engines kept between rounds (a call's first variant ran a few per cent slow once: order effects
    show up as a difference between rounds)."""
    engines = {}
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            try:
                if variant not in engines:
                    engines[variant] = prepare(model, variant, res)
                time_round(engines[variant], variant, res)
            except Exception:  # noqa: BLE001
                log(f"[{variant}] timing FAILED\n{traceback.format_exc()}")
                res.setdefault("errors", []).append(f"timing {variant}: {traceback.format_exc()}")
                variants = [v for v in variants if v != variant]  # not again in later rounds
            if rounds == 1:
                engines.pop(variant, None)
                gc.collect()
                torch.cuda.empty_cache()
            save()
    engines.clear()
    gc.collect()
    torch.cuda.empty_cache()


def time_hf(model, res):
    rng = np.random.default_rng(2)
    out = res.setdefault("hf", {})
    with torch.no_grad():
        ids = torch.from_numpy(rng.integers(3, 32000, (1, CTX))).cuda()
        out["prefill128_ms"] = wall_median_ms(lambda: model(ids), 10)
        for b in (1, 64):
            ids = torch.from_numpy(rng.integers(3, 32000, (b, CTX))).cuda()
            am = torch.ones_like(ids)

            def gen(n):
                return lambda: model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=n,
                                              min_new_tokens=n)

            t1 = wall_median_ms(gen(1), 3, warm=1)
            t33 = wall_median_ms(gen(33), 3, warm=1)
            out[f"b{b}"] = {"step_ms": (t33 - t1) / 32}
            log(f"[HF generate] batch {b}: {out[f'b{b}']['step_ms']:.3f} ms per decode step")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--only-correctness", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of VARIANTS to time")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="time the variants this many times, alternately in "
                    "the given and the reverse order, each figure the smallest (engines kept between rounds)")
    ap.add_argument("--skip-long", action="store_true", help="no context-896 timings, no profile")
    ap.add_argument("--profile", default="", help="comma list of VARIANTS whose step is profiled (with "
                    "--skip-long too)")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    try:
        import transformers
        import triton

        res["transformers"], res["triton"] = transformers.__version__, triton.__version__
    except Exception:  # noqa: BLE001
        pass
    log(json.dumps(res))
    t0 = time.time()
    bw = copy_bandwidth()
    res["copy_bw_GBps"] = bw / 1e9
    model = build_model()
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["weight_GB"] = wbytes / 1e9
    res["bound_b1_ms"] = wbytes / bw * 1e3
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s; weights {wbytes / 1e9:.2f} GB; batch-1 bound "
        f"{res['bound_b1_ms']:.3f} ms; model built at {time.time() - t0:.1f} s")

    if not args.skip_correctness:
        ref32 = copy.deepcopy(model).float()
        check_correctness(model, ref32, res)
        del ref32
    gc.collect()
    torch.cuda.empty_cache()
    log(f"correctness done at {time.time() - t0:.1f} s")
    if args.only_correctness:
        (out_dir / "results.json").write_text(json.dumps(res, indent=1))
        return

    def save():
        (out_dir / "results.json").write_text(json.dumps(res, indent=1))

    time_variants(model, args.variants.split(","), res, args.rounds, save)
    for variant in ("triton+graphs", "torch-sdpa+graphs") if not args.skip_long else ():
        try:
            ex = prepare(model, variant, res)
            time_round(ex, variant, res, long_ctx=True)
            del ex
            gc.collect()
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            log(f"[{variant}] long-context timing FAILED\n{traceback.format_exc()}")
    for variant in args.profile.split(",") if args.profile else ([] if args.skip_long else ["triton+graphs"]):
        try:
            profile_step(model, res, variant)
        except Exception:  # noqa: BLE001
            log(f"[profile {variant}] FAILED\n{traceback.format_exc()}")
    if not args.skip_hf:
        try:
            time_hf(model, res)
        except Exception:  # noqa: BLE001
            log(f"[HF] timing FAILED\n{traceback.format_exc()}")
    res["wall_s"] = time.time() - t0
    (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    table(res)


def table(res):
    kv_row = 22 * 2 * 4 * 64 * 2  # KV bytes per cached position (all layers, K and V, bf16)
    bw = res["copy_bw_GBps"] * 1e9
    lines = [f"device {res['device']}, torch {res['torch']}, copy bw {res['copy_bw_GBps']:.0f} GB/s, "
             f"weights {res['weight_GB']:.2f} GB; decode at context {CTX} (times in ms)",
             f"{'variant':26s} {'batch':>5s} {'step':>8s} {'decode()':>9s} {'bound':>7s} {'x bound':>7s} "
             f"{'tok/s':>8s} {'vs HF':>6s}"]
    hf = res.get("hf", {})
    for variant, t in res.get("timings", {}).items():
        for key, v in t.items():
            if not key.startswith("b"):
                continue
            b = int(key[1:].split("_")[0])
            ctx = 896 if "ctx896" in key else CTX
            bound = (res["weight_GB"] * 1e9 + b * (ctx + 1) * kv_row) / bw * 1e3
            vs = hf.get(f"b{b}", {}).get("step_ms")
            ratio = f"{vs / v['step_ms']:.1f}x" if vs and ctx == CTX else ""
            star = "*" if ctx != CTX else " "
            lines.append(f"{variant:26s} {b:5d}{star}{v['step_ms']:8.3f} {v['call_ms']:9.3f} "
                         f"{bound:7.3f} {v['step_ms'] / bound:7.2f} {b / v['step_ms'] * 1e3:8.0f} {ratio:>6s}")
    for b in (1, 64):
        if f"b{b}" in hf:
            lines.append(f"{'HF generate (bf16)':26s} {b:5d} {hf[f'b{b}']['step_ms']:8.3f}")
    timings = res.get("timings", {})
    base = timings.get("triton+graphs", {})
    for fmt in ("int8", "fp8"):  # the 8-bit steps against the bf16 one, and against their own bound
        q = timings.get(f"triton+graphs {fmt}", {})
        for b in BATCHES:
            if f"b{b}" in base and f"b{b}" in q:
                own = (q["weight_bytes"] + b * (CTX + 1) * kv_row) / bw * 1e3
                lines.append(f"{fmt} ÷ bf16 step at batch {b}: {q[f'b{b}']['step_ms'] / base[f'b{b}']['step_ms']:.3f} "
                             f"({fmt} {q[f'b{b}']['step_ms']:.3f} ms = {q[f'b{b}']['step_ms'] / own:.2f} x its own "
                             f"bound {own:.3f} ms, {q['weight_bytes'] / 1e9:.2f} GB of weights)")
    for name, other in (("fp8", "fp8 w8a16"), ("fp8 w8a8", "fp8 w8a16"), ("fp8", "fp8 unfused"),
                        ("fp8 a8from33", "fp8"), ("fp8 a8kernel", "fp8"), ("tma", ""), ("int8 tma", "int8"),
                        ("fp8 tma", "fp8 a8kernel"), ("fp8 tma-w8a16", "fp8"),
                        ("fp8", "fp8 a8only")):
        q, o = timings.get(f"triton+graphs {name}", {}), timings.get(f"triton+graphs {other}".strip(), {})
        for b in BATCHES:  # W8A8 against W8A16, and its input rounded in the op before against on its own
            if f"b{b}" in q and f"b{b}" in o:
                lines.append(f"{name} ÷ {other}, batch {b}: {q[f'b{b}']['step_ms'] / o[f'b{b}']['step_ms']:.3f} "
                             f"({q[f'b{b}']['step_ms']:.3f} / {o[f'b{b}']['step_ms']:.3f} ms)")
    for name, t in timings.items():  # each variant with programmatic dependent launch against it without
        off = timings.get(f"{name} nopdl", {})
        for b in BATCHES:
            if f"b{b}" in t and f"b{b}" in off:
                lines.append(f"PDL on ÷ off, {name}, batch {b}: {t[f'b{b}']['step_ms'] / off[f'b{b}']['step_ms']:.3f} "
                             f"({t[f'b{b}']['step_ms']:.3f} / {off[f'b{b}']['step_ms']:.3f} ms)")
    lines.append("prefill 128 tokens (ms): " + ", ".join(
        f"{k} {v['prefill128_ms']:.2f}" for k, v in res.get("timings", {}).items() if "prefill128_ms" in v)
        + (f", HF forward {hf['prefill128_ms']:.2f}" if "prefill128_ms" in hf else ""))
    lines.append("* = context 896")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The compiles of an engine's first start: every candidate the 8-bit products' tuner times
(`W8Matmul.tuning_jobs`, the TinyLlama-shaped products or a small set), compiled by `precompile` in
1, 2, ... threads (`TRITONCHAT_COMPILE_THREADS`), each count in a process of its own with an empty
Triton cache. Prints the configurations, the distinct kernels compiled and the seconds, and the
speed-up over one thread.

On a machine without the GPU (`--offline`, the default where CUDA is absent) the kernels are
compiled for an H100 (sm_90) all the same: Triton's JIT asks its active driver only for the target,
the device and the stream until it launches, and `Hopper` below answers those. What it times is
the compiler's work alone, the part of a first start that threads can spread (a GPU's start adds
the timing of each candidate).

    python benchmarks/tune_compile.py --threads 1,2 --weights int8,fp8,dtype
    python benchmarks/tune_compile.py --threads 2 --shapes small --tma --a8-kernel --one-per-form --json  # the test's
    python benchmarks/tune_compile.py --threads 16 --weights fp8 --offline --cache DIR   # kernels ahead of a start
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (N, K) of a TinyLlama-1.1B layer's products (qkv, o, gate·up, down) and of its LM head
TINYLLAMA = ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048))
SMALL = ((256, 512),)


class Hopper:
    """What `JITFunction.run` asks the active driver before a launch, answered for an H100 (sm_90)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_all(args) -> dict:
    """One process: the tuner's jobs for `args.weights`, compiled by `precompile`; then each
    configuration warmed up again (what the tuner's first launch of it would compile: nothing)."""
    import torch
    from triton import knobs
    from triton.runtime import driver

    offline = args.offline or not torch.cuda.is_available()
    if offline:
        driver.set_active(Hopper())
    from tritonchat.python_backend.engines.torch.kernels import load_kernels
    from tritonchat.python_backend.engines.torch.matmul import TUNE_ROWS, W8A8_ROWS, W8Matmul, compile_threads
    from tritonchat.python_backend.engines.torch.quant import DenseWeight, QuantWeight

    compiled: list[str] = []
    knobs.runtime.jit_post_compile_hook = lambda *, repr, **_: compiled.append(repr.split("[")[0].rsplit(".", 1)[-1])
    device = "cpu" if offline else "cuda"
    sms = args.sms if offline else torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    runs, forms = [], set()
    for fmt in args.weights.split(","):
        # FP8 on Hopper: W8A8 above W8A8_ROWS rows, as the engine's default
        mm = W8Matmul(load_kernels(), sms, pdl=True, w8a8_rows=W8A8_ROWS if fmt == "fp8" else None)
        mm.tma_kernel, mm.a8_kernel = args.tma, args.a8_kernel
        shapes = {}
        for n, k in (SMALL if args.shapes == "small" else TINYLLAMA):
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            shapes[(n, k)] = DenseWeight(w) if fmt == "dtype" else QuantWeight(w, fmt, torch.bfloat16)
        for _, cfgs, run, _ in mm.tuning_jobs(shapes, list(TUNE_ROWS)):
            if args.one_per_form:
                cfgs = list({cfg["FORM"]: cfg for cfg in reversed(cfgs)}.values())
            runs += [(run, cfg) for cfg in cfgs]
            forms |= {cfg["FORM"] for cfg in cfgs}
    threads = compile_threads()
    t = time.perf_counter()
    if threads > 1:
        mm.precompile(runs)
    else:  # one after another, as each first launch compiles without `precompile`
        for run, cfg in runs:
            run(cfg, warmup=True)
    seconds = time.perf_counter() - t
    first = len(compiled)
    for run, cfg in runs:
        run(cfg, warmup=True)
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    binaries = len(list(cache.glob("*/*.cubin")))  # each compile's binary (a JIT miss the disk had: none)
    return dict(threads=threads, configurations=len(runs), kernels=binaries, jit_compiles=first,
                kernel_names=sorted(set(compiled[:first])),
                again=len(compiled) - first, seconds=round(seconds, 2), forms=sorted(forms), offline=offline)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, one process each")
    ap.add_argument("--weights", default="int8,fp8,dtype", help="int8, fp8, dtype (bf16 weights on the kernel)")
    ap.add_argument("--shapes", default="tinyllama", choices=["tinyllama", "small"])
    ap.add_argument("--tma", action="store_true", help="the TMA form's candidates too (W8Matmul.tma_kernel)")
    ap.add_argument("--a8-kernel", action="store_true", help="the FP8 form's too (W8Matmul.a8_kernel)")
    ap.add_argument("--one-per-form", action="store_true", help="only each job's first configuration of each "
                    "form (a quick check of every form's warm-up)")
    ap.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU even where one is")
    ap.add_argument("--sms", type=int, default=132, help="offline: the GPU's SMs (the split-K candidates "
                    "depend on them; an H100 SXM and an H200 have 132)")
    ap.add_argument("--cache", help="keep the compiled kernels in this Triton cache folder (one thread count; "
                    "default: an empty folder of its own for each, removed after)")
    ap.add_argument("--json", action="store_true", help="one JSON line per thread count, no table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(compile_all(args)))
        return
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
            env = dict(os.environ, TRITONCHAT_COMPILE_THREADS=str(threads), TRITON_CACHE_DIR=args.cache or cache)
            env.pop("TRITON_INTERPRET", None)
            r = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True,
                               text=True, timeout=3600)
        if r.returncode:
            raise SystemExit(f"{threads} threads failed:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(json.dumps(r) if args.json else
              f"{threads:>3} threads: {r['configurations']} configurations, {r['kernels']} kernels compiled in "
              f"{r['seconds']:.1f} s ({rows[0]['seconds'] / r['seconds']:.2f}x as fast as the first row), "
              f"{r['again']} compiled again{' (sm_90, no GPU)' if r['offline'] else ''}", flush=True)


if __name__ == "__main__":
    main()

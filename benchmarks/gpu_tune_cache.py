#!/usr/bin/env python3
"""Engine start with the tuner's compiles one after another or in parallel (`W8Matmul.precompile`,
`TRITONCHAT_COMPILE_THREADS`), and with the kept tuning of the 8-bit products' kernel
(`W8Matmul.tune`, `TorchEngine(tune_cache=...)`): one process per start, each with an empty Triton
cache of its own (`TRITON_CACHE_DIR`), so each start pays its own compiles as a new pod's server would.
A TinyLlama-shaped Llama of `--layers` layers (the products' shapes, hence the tuning, are the full
model's), seeded random weights. A fourth start finds its kernels compiled before it, for this GPU's
target but without the GPU (`benchmarks/tune_compile.py --offline`, what an image build could do):
whether Triton's cache keys match. Prints each start's engine + warmup time, whether it took the
kept choices, the kernels it compiled itself, and that the two starts on one kept tuning chose the
same configurations and all give the same greedy tokens. A fifth start (`volume`) finds both the kept
tuning and the Triton cache the parallel start filled: a pod restarting, or a new pod, on a volume that
holds both (deploy/k8s/overlays/gpu).

    python3 benchmarks/gpu_tune_cache.py --weights fp8 --cache /tmp/tune-cache
    python3 benchmarks/gpu_tune_cache.py --weights fp8 --cache /tmp/tune-cache --starts parallel,volume
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

_START = r"""
import json, sys, time, numpy as np, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tritonchat.python_backend.engines.torch import TorchEngine
weights, cache, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
t = time.perf_counter()
ex = TorchEngine(model=model, max_slots=16, max_seq_len=512, device="cuda", dtype="bfloat16", weights=weights,
                 tune_cache=cache or None)
ex.warmup()
start = time.perf_counter() - t
tok = [int(ex.prefill(0, np.arange(3, 40)).argmax())]
for _ in range(8):
    tok.append(int(ex.decode_greedy(np.array([0]), np.array([tok[-1]]))[0]))
print(json.dumps(dict(start_s=round(start, 1), tuned_from=ex.describe().get("tuned_from"), tokens=tok,
                      compile_s=round(ex.llama.mm.compile_s, 1),
                      configs=sorted([list(k), v] for k, v in ex.llama.mm.configs.items()))))
"""


# name: (what it finds, kept tuning, compile threads ("": the default), its Triton cache)
STARTS = {
    "serial": ("no kept tuning, compiles one after another", False, "1", "empty"),
    "parallel": ("kept tuning empty, compiles in parallel", True, "", "kept"),
    "kept": ("kept tuning taken", True, "", "empty"),
    # kernels compiled before the start by benchmarks/tune_compile.py for this GPU's target with no GPU
    # in that process (as an image build could): a start that finds them all in Triton's cache
    # compiles nothing of its own ("new kernels" 0) and only times the candidates
    "ahead": ("no kept tuning, kernels compiled ahead without the GPU", False, "1", "ahead"),
    # the kept tuning and the Triton cache `parallel` filled, as a volume would keep them for a new pod
    "volume": ("kept tuning and Triton's cache both kept", True, "", "kept"),
}


def compile_ahead(weights: str, kernels: str) -> None:
    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    t = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).with_name("tune_compile.py")), "--threads",
                    str(os.cpu_count()), "--weights", weights, "--offline", "--sms", str(sms),
                    "--cache", kernels], check=True, timeout=900)
    print(f"  kernels compiled ahead for sm_{''.join(map(str, torch.cuda.get_device_capability()))} "
          f"without the GPU in {time.perf_counter() - t:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="fp8", help="dtype | int8 | fp8")
    ap.add_argument("--cache", required=True, help="the tuning cache folder (emptied first)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--starts", default="serial,parallel,kept,ahead,volume",
                    help=f"which starts, in order, of {', '.join(STARTS)} (kept and volume after parallel)")
    args = ap.parse_args()
    starts = args.starts.split(",")
    if unknown := [s for s in starts if s not in STARTS]:
        ap.error(f"--starts: no start named {', '.join(unknown)} (there are {', '.join(STARTS)})")
    subprocess.run(["rm", "-rf", args.cache], check=True)
    tuning, kept_kernels = Path(args.cache) / "tuning", Path(args.cache) / "triton"
    runs = []
    for start in starts:
        name, keep, threads, triton_cache = STARTS[start]
        with tempfile.TemporaryDirectory(prefix="triton-cache-") as fresh:
            kernels = str(kept_kernels) if triton_cache == "kept" else fresh
            if triton_cache == "ahead":
                compile_ahead(args.weights, kernels)
            before = len(list(Path(kernels).glob("*/*.cubin")))
            t = time.perf_counter()
            env = dict(os.environ, TRITONCHAT_COMPILE_THREADS=threads, TRITON_CACHE_DIR=kernels)
            out = subprocess.run([sys.executable, "-c", _START, args.weights, str(tuning) if keep else "",
                                  str(args.layers)], capture_output=True, text=True, timeout=600, env=env)
            new = len(list(Path(kernels).glob("*/*.cubin"))) - before
        if out.returncode:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{name}: the start failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(f"{args.weights} {name}: engine + warmup {r['start_s']} s (process {time.perf_counter() - t:.1f} s), "
              f"tuning {'taken from ' + r['tuned_from'] if r['tuned_from'] else 'timed'}, "
              f"{len(r['configs'])} products on the kernel, parallel compiles {r['compile_s']} s, "
              f"new kernels {new}", flush=True)
    kept = [r for s, r in zip(starts, runs) if STARTS[s][1]]
    print("starts on one kept tuning chose the same configurations:",
          all(r["configs"] == kept[0]["configs"] for r in kept),
          "; same greedy tokens:", all(r["tokens"] == runs[0]["tokens"] for r in runs))

if __name__ == "__main__":
    main()

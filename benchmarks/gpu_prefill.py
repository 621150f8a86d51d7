#!/usr/bin/env python3
"""Prefill cost by group size on the GPU: what one `prefill_batch` of k prompts takes, and where.

TinyLlama-1.1B-shaped seeded random Llama in bf16 (as benchmarks/torch_executor_gpu.py), the
executor as the server builds it (Triton kernels, CUDA graphs for decode). Prints, for k prompts of
128 tokens, the wall time of `prefill_batch` (the host gets the last logits, as the scheduler does)
and the per-prompt cost; then the top CUDA kernels and the CPU-side ops of one k=12 prefill.

    python3 benchmarks/gpu_prefill.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_executor_gpu import build_model  # noqa: E402

try:
    from tritonchat.python_backend.engine_torch import TorchExecutor
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from python_backend.engine_torch import TorchExecutor


def main() -> None:
    ex = TorchExecutor(model=build_model(), max_slots=64, max_seq_len=512, device="cuda", dtype="bfloat16")
    ex.warmup()
    rng = np.random.default_rng(0)
    print(f"{'k':>3} {'prefill ms':>11} {'ms / prompt':>12}")
    for k in (1, 2, 4, 8, 12, 16, 32):
        prompts = [rng.integers(3, 30000, 128) for _ in range(k)]
        times = []
        for _ in range(7):
            for s in range(k):
                ex.release(s)
            torch.cuda.synchronize()
            t = time.perf_counter()
            ex.prefill_batch(list(range(k)), prompts)
            times.append(time.perf_counter() - t)
        ms = float(np.median(times[2:])) * 1e3
        print(f"{k:>3} {ms:>11.2f} {ms / k:>12.2f}")
    prompts = [rng.integers(3, 30000, 128) for _ in range(12)]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ex.prefill_batch(list(range(12)), prompts)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

"""What a sampled decode step adds on the GPU: the tokens drawn on the device (engines/torch/sample.py,
after the step's graph) against the host path it replaces (the step's logits copied to the host in
float32, then the host sampler row by row), for batches of 1 to 128 rows of a 32,000-id vocabulary.

    python3 benchmarks/gpu_draw.py [--vocab 32000] [--rows 1,16,64,128]

Prints ms per step for each (median of --repeats), with temperature 0.8 and top_p 0.95 (flat random
logits: a wide nucleus, the slow case for the host's partial sort) and temperature 0.8 alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tritonchat.python_backend.engines.base import Draws, draw_tokens
from tritonchat.python_backend.engines.torch.sample import DrawInputs, draw


def _draws(rows: int, top_p: float, rng) -> Draws:
    return Draws(np.arange(rows), np.full(rows, 0.8, np.float32), np.zeros(rows, np.int64),
                 np.full(rows, top_p, np.float32), rng.random(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", default="1,16,64,128")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    print(f"{torch.cuda.get_device_name()}, vocab {args.vocab}; ms per step (median of {args.repeats})")
    print("| rows | top_p | device draw | host: copy + sampler | host ÷ device |")
    print("|---:|---:|---:|---:|---:|")
    for rows in [int(r) for r in args.rows.split(",")]:
        logits = (torch.randn(rows, args.vocab, device=dev) * 3).to(torch.bfloat16)
        for top_p in (0.95, 1.0):
            dev_ms, host_ms = [], []
            for _ in range(args.repeats + 3):
                d = _draws(rows, top_p, rng)
                torch.cuda.synchronize()
                t = time.perf_counter()
                taken, _ = draw(logits, DrawInputs(d, d.rows, dev))
                taken.cpu()  # the step's ids come back to the host either way
                dev_ms.append(1e3 * (time.perf_counter() - t))
                t = time.perf_counter()
                host = logits.float().cpu().numpy()
                draw_tokens(host, d)
                host_ms.append(1e3 * (time.perf_counter() - t))
            a, b = statistics.median(dev_ms[3:]), statistics.median(host_ms[3:])
            print(f"| {rows} | {top_p:g} | {a:.3f} | {b:.3f} | ×{b / a:.1f} |")


if __name__ == "__main__":
    main()

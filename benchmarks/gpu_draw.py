"""What a sampled decode step adds on the GPU: the tokens drawn on the device (engines/torch/sample.py,
after the step's graph) against the host path it replaces (the step's logits copied to the host in
float32, then the host sampler row by row), for batches of 1 to 128 rows of a 32,000-id vocabulary.

    python3 benchmarks/gpu_draw.py [--vocab 32000] [--rows 1,16,64,128] [--profile 64]

Prints ms per step for each (median of --repeats): the draw op by op (`sample.draw`, with its copies,
the tokens back on the host), the GPU time of one replay of its CUDA graph (`sample.draw_packed`, as
the engine runs it with CUDA graphs on; CUDA events), the same graph with the draw after its sort in
one Triton kernel (draw_kernel.py, as the engine runs it with its Triton kernels), and the host path;
with temperature 0.8 and top_p 0.95 (flat random logits: a wide nucleus, the slow case for the host's
partial sort), temperature 0.8 alone (no sort: `Draws.ordered` is False), and top_p
0.95 with a repetition penalty of 1.1 (the engine's token counts of 128 prompt and 64 output tokens
a row on the device; the host's `penalize` over its own counts). `--profile N`: the kernels of the
N-row graph's replays, by GPU time (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tritonchat.python_backend.engines.base import Draws, draw_tokens, penalize
from tritonchat.python_backend.engines.torch.draw_kernel import for_engine
from tritonchat.python_backend.engines.torch.sample import (DRAW_IN, DrawInputs, TokenCounts, draw, pack_draws,
                                                            packed_body)


def _draws(rows: int, top_p: float, rng, repetition: float = 1.0) -> Draws:
    pen = None if repetition == 1.0 else np.array([[repetition, 0.0, 0.0]] * rows).T
    return Draws(np.arange(rows), np.full(rows, 0.8, np.float32), np.zeros(rows, np.int64),
                 np.full(rows, top_p, np.float32), rng.random(rows), pen)


def _graph(logits, d: Draws, counts: TokenCounts, kernel=None):
    """The draw graph of these rows (as graphs.StepGraphs captures it), or None off CUDA."""
    if logits.device.type != "cuda":
        return None
    rows = len(d.rows)
    a = np.empty((DRAW_IN, rows), np.int64)
    pack_draws(a, d, d.rows, d.rows, rows)
    inp = torch.from_numpy(a).to(logits.device)
    z = logits.index_select(0, inp[0])
    body = packed_body(counts, torch.zeros(rows + 1, dtype=torch.int64, device=logits.device), kernel)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body(z, inp, d.penalties is not None, d.ordered)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body(z, inp, d.penalties is not None, d.ordered)
    return graph


def _replay_ms(graph, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _profile(graph) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(events.table(sort_by=key, row_limit=15))
            return
        except (AttributeError, KeyError, ValueError):
            continue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", default="1,16,64,128")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--profile", type=int, default=0, help="rows of the graph whose kernels to list (0: none)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke run
    rng = np.random.default_rng(0)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{name}, vocab {args.vocab}; ms per step (median of {args.repeats})")
    print("| rows | top_p | repetition | device draw, op by op | its graph (GPU time) | the graph with the draw "
          "kernel (GPU time) | host: copy + sampler | host ÷ device |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    kernel = for_engine(dev.type == "cuda")
    for rows in [int(r) for r in args.rows.split(",")]:
        logits = (torch.randn(rows, args.vocab, device=dev) * 3).to(torch.bfloat16)
        counts = TokenCounts(rows + 1, args.vocab, dev)
        seen = np.zeros((rows, args.vocab), bool)
        made = np.zeros((rows, args.vocab), np.int32)
        for r in range(rows):  # a prompt of 128 tokens and 64 fed ones a row
            prompt = rng.integers(0, args.vocab, 128)
            counts.track(r, prompt)
            seen[r, prompt] = True
        for _ in range(64):
            toks = rng.integers(0, args.vocab, rows)
            counts.count(np.arange(rows), toks, None)
            made[np.arange(rows), toks] += 1
        seen |= made > 0
        for top_p, rep in ((0.95, 1.0), (1.0, 1.0), (0.95, 1.1)):
            dev_ms, host_ms = [], []
            for _ in range(args.repeats + 3):
                d = _draws(rows, top_p, rng, rep)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                taken, _ = draw(logits, DrawInputs(d, d.rows, dev, d.rows), counts)
                taken.cpu()  # the step's ids come back to the host either way
                dev_ms.append(1e3 * (time.perf_counter() - t))
                t = time.perf_counter()
                host = logits.float().cpu().numpy()
                if rep != 1.0:
                    for r in range(rows):
                        penalize(host[r], seen[r], made[r], rep, 0.0, 0.0)
                draw_tokens(host, d)
                host_ms.append(1e3 * (time.perf_counter() - t))
            a, b = statistics.median(dev_ms[3:]), statistics.median(host_ms[3:])
            graph, fused = _graph(logits, d, counts), _graph(logits, d, counts, kernel) if kernel else None
            g, f = ("–" if x is None else f"{_replay_ms(x, args.repeats):.3f}" for x in (graph, fused))
            print(f"| {rows} | {top_p:g} | {rep:g} | {a:.3f} | {g} | {f} | {b:.3f} | ×{b / a:.1f} |")
            if graph is not None and rows == args.profile and top_p < 1 and rep == 1.0:
                for x in (graph, fused):
                    if x is not None:
                        _profile(x)


if __name__ == "__main__":
    main()

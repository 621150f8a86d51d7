#!/usr/bin/env python3
"""The generator's engine + scheduler on the GPU without Triton: where a 64-stream run's time goes.

TinyLlama-1.1B-shaped seeded random Llama in bf16 (`common.build_model`), the
engine as the server builds it (max_slots 128, context 512, Triton kernels, CUDA graphs).

  1. one decode step at batch 64 (context 192): graph replay alone (device events), and the kernels
     of one step by time (torch profiler over the graph replays);
  2. one batched prefill of k prompts of 128 tokens, k = 1 ... 64 (host wall, logits on the host);
  3. a closed loop of C streams through the real `Scheduler` (streaming, greedy, min_tokens =
     max_tokens = 128, the Llama-2 tokenizer's `TextTracker`): a stream sends its next request the
     moment its last response leaves the courier, as the benchmark client does over the network.
     Prints output tokens/s and the scheduler's time split per variant of its settings.

Compare 3 with the same level through tritonserver (benchmarks/gpu_triton.sh) to see what serving
costs; compare it with 1 and 2 to see what the scheduler leaves on the table.

    TRITONCHAT_SHARED=../shared python3 benchmarks/gpu_sched.py [--streams 64] [--requests 640]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import threading
import time

import numpy as np
import torch
from common import build_model, cuda_median_ms, prefill_times

from tritonchat.build.synthetic import load_tokenizer
from tritonchat.python_backend.batching.detokenize import TextTracker
from tritonchat.python_backend.batching.sampling import SamplingParams
from tritonchat.python_backend.batching.scheduler import Scheduler, Sequence
from tritonchat.python_backend.engines import Ban
from tritonchat.python_backend.engines.torch import TorchEngine


@contextlib.contextmanager
def batch_at(ex, batch: int, ctx: int):
    """Slots 0..batch-1 holding `ctx` positions each for the block (released after it)."""
    ex._lengths[:batch] = ctx
    try:
        yield np.arange(batch)
    finally:
        for s in range(batch):
            ex.release(s)


def step_graph(ex, batch: int, ctx: int):
    """The decode graph of `batch` rows at context `ctx`, its inputs set by one real step."""
    with batch_at(ex, batch, ctx) as slots:
        ex.decode_greedy_begin(slots, np.ones(batch, np.int64)).result()
    return ex.graphs.decode[(ex.graphs.batch_size(batch), None)][0]


def decode_step(ex, batch: int, ctx: int) -> float:
    """Median ms of one graph replay of the decode step at `batch` rows of context `ctx`."""
    return cuda_median_ms(step_graph(ex, batch, ctx).replay, 50)


def mixed_step(ex, batch: int, ctx: int, k: int, plen: int = 128) -> float:
    """Median ms of one graph replay of a decode step of `batch` rows at context `ctx` that also
    prefills `k` prompts of `plen` tokens (0: the plain decode step)."""
    if k == 0:
        return decode_step(ex, batch, ctx)
    rng = np.random.default_rng(0)
    pslots = np.arange(batch, batch + k)
    with batch_at(ex, batch, ctx) as slots:
        ex.decode_greedy_begin(slots, np.ones(batch, np.int64),
                               prompts=(pslots, [rng.integers(3, 30000, plen) for _ in range(k)])).result()
    for s in pslots:
        ex.release(int(s))
    key = ex._prefill_buckets(np.full(k, plen))
    return cuda_median_ms(ex.graphs.mixed[(ex.graphs.batch_size(batch), None, key)][0].replay, 50)


def kernel_table(ex, batch: int, ctx: int, top: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile

    graph = step_graph(ex, batch, ctx)
    reps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA" or getattr(ev, "device_time", 0):
            t = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
            a = agg[ev.name[:70]]
            a[0] += t
            a[1] += 1
    total = sum(v[0] for v in agg.values()) / reps
    print(f"kernels of one decode step, batch {batch}, context {ctx}: {total / 1e3:.3f} ms of kernel time")
    for name, (t, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {t / reps / 1e3:7.3f} ms {n // reps:4d}x  {name}")


def host_chain(ex, batch: int, ban: bool, steps: int = 200) -> tuple[float, float, float]:
    """Chained greedy steps as the scheduler runs them, no bookkeeping: (ms per step, ms of it in
    `decode_greedy_begin`, ms waiting in `result`). With `ban`, every row bans one end id (what
    `min_tokens` does)."""
    b = Ban(np.arange(batch), np.array([2])) if ban else None
    t_begin = t_wait = 0.0
    with batch_at(ex, batch, 128) as slots:
        step = ex.decode_greedy_begin(slots, np.ones(batch, np.int64), b)
        step.result()
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            ahead = ex.decode_greedy_begin(slots, None, b, chain=step)
            t_begin += time.perf_counter() - t
            t = time.perf_counter()
            step.result()
            t_wait += time.perf_counter() - t
            step = ahead
        step.result()
        wall = time.perf_counter() - t0
    return 1e3 * wall / steps, 1e3 * t_begin / steps, 1e3 * t_wait / steps


def sync_report(ex, batch: int) -> None:
    """Which host<->device synchronisations one chained, banned step makes (torch's sync debug)."""
    import warnings

    b = Ban(np.arange(batch), np.array([2]))
    with batch_at(ex, batch, 128) as slots:
        step = ex.decode_greedy_begin(slots, np.ones(batch, np.int64), b)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ahead = ex.decode_greedy_begin(slots, None, b, chain=step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        step.result()
        ahead.result()
    print(f"synchronising ops in one chained banned step: {len(caught)}")
    for w in caught[:5]:
        print("  ", str(w.message).splitlines()[0][:160])


def prefill_ms(ex, k: int, rng) -> tuple[float, float]:
    """(first call, median of the later ones) in ms: the first one captures the bucket's graph."""
    times = prefill_times(ex, [rng.integers(3, 30000, 128) for _ in range(k)], reps=6)
    return times[0], float(np.median(times[2:]))


class ClosedLoop:
    """C streams; each sends its next request when its previous one's final response went out."""

    def __init__(self, sched: Scheduler, tokenizer, streams: int, requests: int, prompt: int, output: int):
        self.sched, self.tok = sched, tokenizer
        self.left = requests
        self.output = output
        self.rng = np.random.default_rng(1)
        self.prompt = prompt
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.tokens = 0
        self.ttft: list[float] = []
        self.finished = 0
        self.requests = requests
        self.t0 = time.perf_counter()
        for _ in range(streams):
            self._send()

    def _send(self) -> None:
        with self.lock:
            if self.left == 0:
                return
            self.left -= 1
        sent = time.perf_counter()
        first = [None]

        def sink(out):
            if first[0] is None:
                first[0] = time.perf_counter() - sent
            if out.final:
                with self.lock:
                    self.tokens += out.num_output_tokens
                    self.ttft.append(first[0])
                    self.finished += 1
                    if self.finished == self.requests:
                        self.done.set()
                self._send()

        params = SamplingParams(max_tokens=self.output, min_tokens=self.output, end_ids=(2,))
        self.sched.submit(Sequence(self.rng.integers(3, 30000, self.prompt), params,
                                   TextTracker(self.tok), sink=sink, stream=True))


def closed_loop(ex, tok, streams: int, requests: int, **sched_kw) -> dict:
    sched = Scheduler(ex, max_queue_size=4096, **sched_kw)
    try:
        loop = ClosedLoop(sched, tok, streams, requests, 128, 128)
        loop.done.wait(300)
        wall = time.perf_counter() - loop.t0
    finally:
        sched.shutdown()
    s = sched.stats.summary()
    return {"tok/s": loop.tokens / wall, "ttft p50 ms": 1e3 * float(np.median(loop.ttft)),
            "steps": s["steps"], "avg batch": s["avg_batch"], "chained": s["chained"],
            "prefill calls": s["prefill_calls"], "mixed steps": s["mixed_steps"],
            "prompts/prefill": s["prompts_per_prefill"],
            "prefill s": s["prefill_s"], "prefill exec s": s["prefill_exec_s"], "launch s": s["launch_s"],
            "decode wait s": s["decode_wait_s"],
            "bookkeeping s": s["bookkeeping_s"], "idle s": s["idle_s"], "queue ms": s["queue_ms_mean"],
            "slot gap ms": s["slot_gap_ms_mean"], "wall s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--requests", type=int, default=640)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--no-loop", action="store_true", help="stop after the step and prefill timings")
    args = ap.parse_args()
    model = build_model()
    tok = load_tokenizer("llama2").backend_tokenizer
    ex = TorchEngine(model=model, max_slots=128, max_seq_len=512, device="cuda", dtype="bfloat16")
    ex.warmup()
    for b in (1, 16, 64, 128):
        print(f"decode graph replay, batch {b:3d}, context 192: {decode_step(ex, b, 192):.3f} ms", flush=True)
    for b in (16, 64):
        plain = mixed_step(ex, b, 192, 0)
        for k in (1, 2, 4):
            ms = mixed_step(ex, b, 192, k)
            print(f"decode step, batch {b:3d}, carrying {k} prompt(s) of 128: {ms:.3f} ms "
                  f"(+{ms - plain:.3f} over the plain step, {(ms - plain) / k:.3f} a prompt)", flush=True)
    if not args.skip_kernels:
        kernel_table(ex, 64, 192)
    sync_report(ex, 64)
    for b in (1, 64):
        for ban in (False, True):
            ms, begin, wait = host_chain(ex, b, ban)
            print(f"chained steps, batch {b:3d}, ban {ban!s:5}: {ms:.3f} ms/step "
                  f"(host in begin {begin:.3f}, waiting {wait:.3f})", flush=True)
    rng = np.random.default_rng(0)
    print("prefill of k prompts x 128 tokens (host wall, ms; the first call captures the graph):", flush=True)
    for k in (1, 2, 4, 8, 16, 32, 64):
        first, ms = prefill_ms(ex, k, rng)
        print(f"  k={k:2d}: {ms:7.2f}   first call {first:7.1f}", flush=True)
    if args.no_loop:
        return
    variants = {
        "default (rate 800/s)": dict(stream_rate=800.0),
        "prompts in own prefills": dict(stream_rate=800.0, mix_prefill=False),
        "default, 2nd round": dict(stream_rate=800.0),
        "own prefills, 2nd round": dict(stream_rate=800.0, mix_prefill=False),
    }
    rows = []
    for name, kw in variants.items():
        r = closed_loop(ex, tok, args.streams, args.requests, **kw)
        rows.append((name, r))
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
              flush=True)
    print(f"\nclosed loop, {args.streams} streams, {args.requests} requests, prompt/output 128:")
    print(f"{'variant':<26} {'tok/s':>8} {'TTFT p50':>9} {'steps':>6} {'batch':>6} {'prefills':>8} "
          f"{'prefill s':>9} {'launch s':>8} {'wait s':>7} {'books s':>7} {'wall s':>6}")
    for name, r in rows:
        print(f"{name:<26} {r['tok/s']:>8.0f} {r['ttft p50 ms']:>9.1f} {r['steps']:>6} {r['avg batch']:>6} "
              f"{r['prefill calls']:>8} {r['prefill s']:>9.2f} {r['launch s']:>8.2f} {r['decode wait s']:>7.2f} "
              f"{r['bookkeeping s']:>7.2f} {r['wall s']:>6.2f}")
    print("graph captures:", ex.captures)


if __name__ == "__main__":
    main()

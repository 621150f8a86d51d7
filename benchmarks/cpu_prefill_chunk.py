"""What `prefill_chunk` buys the running streams when long prompts arrive: the scheduler alone, in-process.

    python3 benchmarks/cpu_prefill_chunk.py --model HF_DIR [--chunks 0,64,128,256] [--streams 8]
        [--long 320] [--rounds 3]

The model's CPU graph is written as the build writes it (the fused graph where it applies, else the
export). Each run: `--streams` requests of 16 prompt tokens decode 160 tokens each; once they run, 4
prompts of `--long` tokens (8 new tokens each) arrive 50 ms apart. Printed per chunk size (best of
`--rounds` alternating rounds, by the worst gap): the running streams' gaps between two tokens while
the long prompts are prefilled (p50, p99, max), and the long prompts' time to first token. Install the
package first (`python3 -m pip install --no-deps --no-build-isolation -e .`).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_graph(model_dir: str, out: Path) -> Path:
    from tritonchat.build import ort_graph
    from tritonchat.build.export import export_onnx, load_model, write_spec

    model = load_model(model_dir)
    path = out / "model.onnx"
    if ort_graph.supported(model)[0]:
        write_spec(ort_graph.write_graph(model, path), out / "kv_spec.json", kv_layout=ort_graph.LAYOUT)
    else:
        write_spec(export_onnx(model, path), out / "kv_spec.json")
    return path


class Tok:
    """Enough of a tokenizer for the scheduler's text tracking (ids as words)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" t{int(i)}" for i in ids)


def run(path: Path, chunk: int, streams: int, long: int, seed: int) -> dict:
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.batching.sequence import Sequence
    from tritonchat.python_backend.engines import open_ort_engine

    ex = open_ort_engine(path, max_slots=streams + 4, max_seq_len=min(long + 200, 512))
    sched = Scheduler(ex, prefill_chunk=chunk, prefix_reuse=False)
    rng = np.random.default_rng(seed)
    stamps: dict[int, list[float]] = {}
    done = []

    def submit(key, prompt, n):
        ev = threading.Event()
        stamps[key] = [time.perf_counter()]

        def sink(out, key=key, ev=ev):
            stamps[key].append(time.perf_counter())
            if out.final:
                ev.set()

        sched.submit(Sequence(np.asarray(prompt, np.int64), SamplingParams(max_tokens=n, min_tokens=n, end_ids=()),
                              TextTracker(Tok()), sink, stream=True))
        done.append(ev)

    try:
        for i in range(streams):
            submit(i, rng.integers(3, ex.vocab_size, 16), 160)
        time.sleep(0.2)
        window = [time.perf_counter()]
        for j in range(4):
            submit(100 + j, rng.integers(3, ex.vocab_size, long), 8)
            time.sleep(0.05)
        for ev in done[streams:]:
            ev.wait(120)
        window.append(time.perf_counter())
        for ev in done:
            ev.wait(120)
    finally:
        sched.shutdown()
    gaps = [1e3 * (b - a) for i in range(streams) for a, b in zip(stamps[i][1:], stamps[i][2:])
            if window[0] <= b <= window[1]]
    ttft = [1e3 * (stamps[100 + j][1] - stamps[100 + j][0]) for j in range(4)]
    return {"p50": float(np.percentile(gaps, 50)), "p99": float(np.percentile(gaps, 99)), "max": max(gaps),
            "ttft": float(np.median(ttft)), "chunks": sched.stats.prefill_chunks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--chunks", default="0,64,128,256")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--long", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from tritonchat.python_backend.allocator import keep_freed_memory

    keep_freed_memory()
    chunks = [int(c) for c in a.chunks.split(",")]
    with tempfile.TemporaryDirectory(prefix="tc-chunk-") as tmp:
        path = write_graph(a.model, Path(tmp))
        best: dict = {}
        for r in range(a.rounds):
            for c in (chunks if r % 2 == 0 else chunks[::-1]):
                got = run(path, c, a.streams, a.long, seed=r)
                if c not in best or got["max"] < best[c]["max"]:
                    best[c] = got
    print(f"{a.streams} streams decoding; 4 prompts of {a.long} tokens arrive 50 ms apart; ms, best of {a.rounds} rounds")
    print(f"{'prefill_chunk':>13s} {'gap p50':>8s} {'gap p99':>8s} {'gap max':>8s} {'long TTFT p50':>14s} {'pieces':>7s}")
    for c in chunks:
        b = best[c]
        print(f"{c:13d} {b['p50']:8.2f} {b['p99']:8.2f} {b['max']:8.2f} {b['ttft']:14.1f} {b['chunks']:7d}")


if __name__ == "__main__":
    main()

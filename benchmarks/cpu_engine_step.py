"""The ONNX Runtime engine's step alone, the TorchScript export against the fused CPU graph, same run.

    python3 benchmarks/cpu_engine_step.py --model HF_DIR [--precisions fp32,int8-weight-only]
        [--threads 1,2] [--batches 1,4,16] [--past 96] [--context 512] [--rounds 3] [--out DIR]

For each precision both graphs are written from the model (`build/export.py` + `build/quantize.py`;
`build/ort_graph.py` + the same quantizer), then every round measures every (graph, threads) pair in
turn, the order reversed every other round: a 32-token prefill, 16 of them in one call, and a decode
step at each batch size with `--past` tokens already cached, in a cache of `--context` positions per
sequence as the server allocates it, logits out (`decode`) and greedy (`greedy`: the argmax too; the
fused fp32 graph runs steps of few rows through the head's 8-bit copy, python_backend/engines/head_screen.py)
(median of 20 calls each; the best round is kept). Printed: milliseconds per call and fused / export.
The process keeps freed memory as the server's model processes do (python_backend/allocator.py). Install the package first
(`python3 -m pip install --no-deps --no-build-isolation -e .`).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def build_graphs(model_dir: str, precisions: list[str], work: Path) -> dict:
    from tritonchat.build import ort_graph
    from tritonchat.build.export import KVSpec, export_onnx, load_model, write_spec
    from tritonchat.build.quantize import quantize

    model = load_model(model_dir)
    spec = KVSpec.from_config(model.config)
    out = {}
    for graph in ("export", "fused"):
        fp32 = work / graph / "fp32" / "model.onnx"
        if graph == "export":
            write_spec(export_onnx(model, fp32), fp32.parent / "kv_spec.json")
        else:
            write_spec(ort_graph.write_graph(model, fp32), fp32.parent / "kv_spec.json", kv_layout=ort_graph.LAYOUT)
            plain = work / graph / "plain" / "model.onnx"  # as the build: a quantized head gets no 8-bit copy
            write_spec(ort_graph.write_graph(model, plain, head_screen=False), plain.parent / "kv_spec.json",
                       kv_layout=ort_graph.LAYOUT)
        for p in precisions:
            src = fp32 if graph == "export" else plain
            out[(graph, p)] = fp32 if p == "fp32" else quantize(src, work / graph / p / "model.onnx", p, spec=spec)
    return out


def median_ms(fn, reps: int = 20) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def measure(path: Path, threads: int, batches: list[int], past: int, context: int) -> dict:
    from tritonchat.python_backend.engines import open_ort_engine

    slots = max(16, *batches)
    ex = open_ort_engine(path, max_slots=slots, max_seq_len=context, threads=threads)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, ex.vocab_size, 32) for _ in range(16)]

    def prefill(n):
        def run():
            for s in range(n):
                ex.release(s)
            ex.prefill_batch(list(range(n)), prompts[:n])
        return run

    res = {"prefill 32": median_ms(prefill(1)), "prefill 16x32": median_ms(prefill(16), reps=5)}
    for s in range(slots):
        ex.release(s)
    ex.prefill_batch(list(range(slots)), [rng.integers(3, ex.vocab_size, past) for _ in range(slots)])
    for b in batches:
        def step():
            ex.decode(np.arange(b), rng.integers(3, ex.vocab_size, b))
            ex.lengths[:b] -= 1  # the same position again: every call does the same work
        res[f"decode b={b}"] = median_ms(step)

        def greedy():  # the argmax too; the fused fp32 graph's steps of few rows run the head's 8-bit copy
            ex.decode_greedy(np.arange(b), rng.integers(3, ex.vocab_size, b))
            ex.lengths[:b] -= 1
        res[f"greedy b={b}"] = median_ms(greedy)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--precisions", default="fp32,int8-weight-only")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--past", type=int, default=96)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from tritonchat.python_backend.allocator import keep_freed_memory

    keep_freed_memory()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per quantized node
    precisions = a.precisions.split(",")
    threads = [int(t) for t in a.threads.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="tc-step-") as tmp:
        graphs = build_graphs(a.model, precisions, Path(tmp))
        runs = [(g, p, t) for p in precisions for t in threads for g in ("export", "fused")]
        best: dict = {}
        for r in range(a.rounds):
            for g, p, t in (runs if r % 2 == 0 else runs[::-1]):
                got = measure(graphs[(g, p)], t, batches, a.past, a.context)
                for k, v in got.items():
                    best[(g, p, t, k)] = min(v, best.get((g, p, t, k), float("inf")))
    keys = ["prefill 32", "prefill 16x32"] + [f"{k} b={b}" for k in ("decode", "greedy") for b in batches]
    print(f"ms per call, best of {a.rounds} rounds (median of 20 calls; decode: past {a.past}, context {a.context})")
    print(f"{'precision':18s} {'threads':>7s} {'call':>14s} {'export':>9s} {'fused':>9s} {'fused/export':>12s}")
    rows = []
    for p in precisions:
        for t in threads:
            for k in keys:
                e, f = best[("export", p, t, k)], best[("fused", p, t, k)]
                rows.append({"precision": p, "threads": t, "call": k, "export_ms": e, "fused_ms": f})
                print(f"{p:18s} {t:7d} {k:>14s} {e:9.2f} {f:9.2f} {f / e:12.2f}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "cpu_engine_step.json").write_text(json.dumps(rows, indent=2))
        print(f"saved {a.out / 'cpu_engine_step.json'}")


if __name__ == "__main__":
    main()

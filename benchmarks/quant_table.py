"""Size, accuracy and CPU decode speed of fp32 / fp16 / int8 / int8-weight-only generator graphs.

    python benchmarks/quant_table.py [--models stories260K,llama-768x12] [--out DIR] [--steps 32]

Models: `stories260K` (the tiny real model in ../shared/models) and `llama-768x12`, a seeded
random-init Llama-shaped model (12 layers, hidden 768, 12 heads / 4 KV heads, MLP 2048, vocab
32000, the Llama-2 tokenizer): its perplexity is near the vocabulary size and its greedy output
near-random, so only its size and speed columns say anything. For each precision the table gives
size on disk (graph + data), perplexity on the TinyStories sample vs the FP32 PyTorch model,
greedy token agreement (64 tokens, 4 prompts), and decode tokens/s through `OrtEngine` at batch
1 and 8 (prompt 16 tokens, `--steps` timed decode steps, median step time; best of `--repeats`
rounds, each round measuring every precision in turn), with ratios vs FP32.
The extra row `int8-dynamic` is the other weight-only candidate (quantize_dynamic: INT8 per-channel
weights, activations quantized per call) measured for the choice documented in docs/quantization.md.
Perplexity and agreement are measured with one thread (the PyTorch reference is slow on a busy
machine otherwise); decode speed with ONNX Runtime's default threads (`--threads` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if not SHARED.exists():
    SHARED = Path("/work/shared")


class SentencePieceTokenizer:
    """Just what evaluate/quantize use (call -> input_ids, bos_token_id) over a .model file."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_token_id = self.sp.bos_id()

    def __call__(self, text, add_special_tokens=False):
        ids = self.sp.encode(text)
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def make_model(name: str):
    import torch
    from transformers import AutoTokenizer

    from tritonchat.build.export import load_model

    if name == "stories260K":
        path = SHARED / "models" / "stories260K"
        return load_model(str(path)), AutoTokenizer.from_pretrained(str(path))
    if name == "llama-768x12":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
        return model, SentencePieceTokenizer(SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    raise SystemExit(f"unknown model {name}")


def decode_speed(onnx_path: Path, batch: int, steps: int, prompt_len: int = 16, threads: int = 0,
                 repeats: int = 3) -> float:
    """Decode tokens/s: best of `repeats` runs of the median step time (best-of filters out the
    moments a shared machine's other jobs take the cores)."""
    return max(_decode_speed(onnx_path, batch, steps, prompt_len, threads) for _ in range(repeats))


def _decode_speed(onnx_path: Path, batch: int, steps: int, prompt_len: int, threads: int) -> float:
    from tritonchat.python_backend.engines.ort import OrtEngine

    ex = OrtEngine(onnx_path, max_slots=batch, max_seq_len=prompt_len + steps + 8, threads=threads)
    rng = np.random.default_rng(0)
    for s in range(batch):
        ex.prefill(s, rng.integers(3, min(ex.vocab_size, 500), prompt_len))
    slots = np.arange(batch)
    tokens = np.full(batch, 5)
    for _ in range(2):  # warm-up
        tokens = ex.decode(slots, tokens).argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        tokens = ex.decode(slots, tokens).argmax(-1)
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260K,llama-768x12")
    ap.add_argument("--precisions", default="fp32,fp16,int8,int8-weight-only,int8-dynamic")
    ap.add_argument("--out", type=Path, default=Path("/tmp/tritonchat-quant-table"))
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "tinystories_sample.txt")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="decode-speed runs, best one kept")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from tritonchat.build.evaluate import evaluate
    from tritonchat.build.export import export_onnx, write_spec
    from tritonchat.build.quantize import artifact_size, quantize, quantize_int8_weight_only

    console = Console(width=220)
    text = args.text.read_text(encoding="utf-8")
    rows = []
    for name in args.models.split(","):
        model, tok = make_model(name)
        base = args.out / name
        fp32 = base / "fp32" / "model.onnx"
        t = time.perf_counter()
        spec = export_onnx(model, fp32)
        write_spec(spec, fp32.parent / "kv_spec.json")
        console.log(f"{name}: exported in {time.perf_counter() - t:.0f} s")
        for precision in args.precisions.split(","):
            out = base / precision / "model.onnx"
            t = time.perf_counter()
            if precision == "int8-dynamic":
                import shutil
                import tempfile

                out.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory() as tmp:
                    quantize_int8_weight_only(fp32, out, work_dir=Path(tmp), method="dynamic")
                shutil.copy(fp32.parent / "kv_spec.json", out.parent / "kv_spec.json")
            elif precision != "fp32":
                quantize(fp32, out, precision, tokenizer=tok, progress=lambda m: console.log(f"  {m}"))
            else:
                out = fp32
            build_s = time.perf_counter() - t
            rep = evaluate(model, out, text=text, tokenizer=tok, new_tokens=64, threads=1)
            row = dict(model=name, precision=precision, size_mb=artifact_size(out) / 1e6, ppl=rep.perplexity,
                       ref_ppl=rep.reference_perplexity, ppl_delta_pct=rep.ppl_delta_pct, kl=rep.kl_divergence,
                       prefix_agreement=rep.prefix_agreement, token_agreement=rep.token_agreement,
                       tok_s_b1=0.0, tok_s_b8=0.0, build_s=build_s, path=str(out))
            rows.append(row)
            console.log(f"  {precision}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})}")
        del model
        # speed in rounds over all precisions, best of `repeats`: a busy spell of a shared machine
        # then slows one round of every variant rather than all rounds of one
        mine = [r for r in rows if r["model"] == name]
        for _ in range(args.repeats):
            for r in mine:
                r["tok_s_b1"] = max(r["tok_s_b1"], decode_speed(Path(r["path"]), 1, args.steps, threads=args.threads,
                                                                repeats=1))
                r["tok_s_b8"] = max(r["tok_s_b8"], decode_speed(Path(r["path"]), 8, args.steps, threads=args.threads,
                                                                repeats=1))
        for r in mine:
            console.log(f"  {r['precision']}: decode {r['tok_s_b1']:.1f} tok/s at batch 1, {r['tok_s_b8']:.1f} at batch 8")

    table = Table(title="Generator graph by precision (ONNX Runtime CPU, OrtEngine)")
    for col in ("model", "precision", "size MB", "size x", "perplexity", "ppl vs PyTorch FP32", "KL",
                "greedy prefix agr.", "greedy pos. agr.", "decode tok/s b1", "x", "decode tok/s b8", "x"):
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    lines = ["| model | precision | size MB | size × | perplexity | Δppl vs PyTorch FP32 | KL nats/token | "
             "greedy prefix agr. | greedy pos. agr. | decode tok/s b1 | × | decode tok/s b8 | × |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = next(x for x in rows if x["model"] == r["model"] and x["precision"] == "fp32")
        cells = [r["model"], r["precision"], f"{r['size_mb']:.2f}", f"{r['size_mb'] / ref['size_mb']:.2f}",
                 f"{r['ppl']:.3f}", f"{r['ppl_delta_pct']:+.2f} %", f"{r['kl']:.4f}", f"{r['prefix_agreement']:.3f}",
                 f"{r['token_agreement']:.3f}", f"{r['tok_s_b1']:.1f}", f"{r['tok_s_b1'] / ref['tok_s_b1']:.2f}",
                 f"{r['tok_s_b8']:.1f}", f"{r['tok_s_b8'] / ref['tok_s_b8']:.2f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

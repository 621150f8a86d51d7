"""What the GPU benchmarks share: timers, the TinyLlama-shaped model, and the decode attention at
the issue's shape.

The benchmarks import the installed package (`tritonchat.*`, public names only) and this file,
which Python finds because it sits beside the script it runs (`python3 benchmarks/NAME.py`: the
script's folder is the first entry of `sys.path`). Nothing edits `sys.path`, so no module is ever
loaded twice under two names. On a fresh machine install the package first, from the repository
root: `python3 -m pip install --no-deps --no-build-isolation -e .` (as `gpu_triton.sh` does,
without `-e`).
"""

from __future__ import annotations

import statistics
import time

import torch

try:
    from tritonchat.python_backend.engines.torch.kernels import cdiv, next_pow2
    # median device time of fn() over `reps` calls, CUDA events around each (the engine's kernel tuner's)
    from tritonchat.python_backend.engines.torch.matmul import cuda_median_ms
except ImportError as exc:  # the checkout alone does not import as `tritonchat`: its folders are mapped
    raise SystemExit(f"{exc}: install the package first, from the repository root: "
                     "python3 -m pip install --no-deps --no-build-isolation -e .") from exc


def log(*a) -> None:
    print(*a, flush=True)


def wall_median_ms(fn, reps: int, warm: int = 2) -> float:
    """Median wall time of `fn()` in ms, the device synchronised before and after each call."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def build_model():
    """A seeded random-init Llama with TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads,
    4 KV heads, intermediate 5632, vocab 32000), built on the GPU in bf16 (no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prefill_times(ex, prompts, reps: int = 7) -> list[float]:
    """Wall ms of `reps` prefills of `prompts` into slots 0.. (released before each and after)."""
    times = []
    for _ in range(reps):
        for s in range(len(prompts)):
            ex.release(s)
        torch.cuda.synchronize()
        t = time.perf_counter()
        ex.prefill_batch(list(range(len(prompts))), prompts)
        times.append((time.perf_counter() - t) * 1e3)
    for s in range(len(prompts)):
        ex.release(s)
    return times


# -- the decode attention kernel at the shape (gpu_attn.py, gpu_l2.py) --------------------
HQ, HKV, D, SLOTS, LAYERS = 32, 4, 64, 128, 22


def launch(tk, q, kc, vc, slots, pos, out, scratch, ns: int, block_n: int, warps: int, stages: int):
    """The engine's split-K decode attention (`tk.attn_split`, + `attn_combine` when split) of the
    rotated queries `q` [b, HQ, D] against the caches `kc`, `vc` [SLOTS, HKV, positions, D]."""
    b, g = q.shape[0], HQ // HKV
    chunk = cdiv(cdiv(kc.shape[2], ns), block_n) * block_n
    acc, mx, lx = scratch if ns > 1 else (out, out, out)
    tk.attn_split[(b, HKV, ns)](
        q, kc, vc, slots, pos, acc, mx, lx, out, out, out, 0, 0, kc.stride(0), kc.stride(1), kc.stride(2),
        D ** -0.5 * 1.4426950408889634, HQ=HQ, HKV=HKV, NS=ns, CHUNK=chunk, G=g, GP=max(16, next_pow2(g)),
        D=D, DP=D, BLOCK_N=block_n, IEEE=False, ROPE=False, num_warps=warps, num_stages=stages)
    if ns > 1:
        tk.attn_combine[(b, HQ)](acc, mx, lx, out, HQ=HQ, NS=ns, D=D, DP=D, num_warps=1)


def graph_us(body, reps: int = 20) -> float:
    """Microseconds per layer of `body()` (LAYERS layers' worth of launches) replayed as one CUDA graph
    (median of `reps`); `body` runs once on a side stream first (compilation, workspaces)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return cuda_median_ms(g.replay, reps) * 1e3 / LAYERS

"""Prefix reuse in the torch engine (`TorchEngine.prefill_cached`, `copy_prefix`, prompts inside a
decode step with cached counts): a prompt on top of the KV its slot still holds, or that another
slot's was copied into, gives the logits and greedy continuation of the same prompt prefilled
whole. The varlen Triton attention runs under Triton's CPU interpreter here (float32), and with bf16
and CUDA graphs on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_engine_torch import _random_model

_SCRIPT = r"""
import sys, numpy as np
from tritonchat.python_backend.engines.torch import TorchEngine

path, device, dtype, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
kw = dict(max_slots=4, max_seq_len=128, device=device, dtype=dtype, kernels="triton", attention="triton",
          cuda_graphs=device == "cuda")
reuse, whole = TorchEngine(path, **kw), TorchEngine(path, **kw)
if device == "cuda":
    reuse.warmup(); whole.warmup()
assert reuse.can_reuse_prefix and not reuse.prompt_chunks
rng = np.random.default_rng(0)
system = rng.integers(3, 512, 37)
a = np.concatenate([system, rng.integers(3, 512, 21)])           # turn 1
b = np.concatenate([a, rng.integers(3, 512, 30)])                # turn 2: turn 1's prompt + more
c = np.concatenate([system, rng.integers(3, 512, 9)])            # another conversation, same system prompt
worst, same = 0.0, 0

def greedy(ex, slots, first, n=8):
    toks = [np.asarray(first)]
    for _ in range(n):
        toks.append(ex.decode_greedy(np.asarray(slots), toks[-1]))
    return np.stack(toks, 1)

# turn 1 in slot 0 runs, answers and leaves; turn 2 reuses its prompt's KV; slot 1 copies the system prompt
greedy(reuse, [0], [int(reuse.prefill(0, a).argmax())], 4)
reuse.release(0)
got = reuse.prefill_cached([0], [b], [len(a)])
reuse.copy_prefix(0, 1, len(system))
got = np.concatenate([got, reuse.prefill_cached([1], [c], [len(system)])])
# two at once, one with nothing cached: one forward
reuse.release(0); reuse.release(1)
got2 = reuse.prefill_cached([0, 2], [b, c], [len(b) - 1, 0])
want = whole.prefill_batch([0, 1], [b, c])
for x, y in ((got, want), (got2, want)):
    worst = max(worst, float(np.abs(x - y).max() / np.abs(y).max()))
    same += int((x.argmax(1) == y.argmax(1)).all())
assert reuse.length(0) == len(b) and reuse.length(2) == len(c)
if device == "cpu":  # the captured graphs' layout, padded to a token bucket, run eagerly
    padded = TorchEngine(path, **kw)
    padded.prefill_graphs = True
    padded.graphs.run_prefill = lambda key, body, layout: body(layout, key)
    padded.prefill_batch([0], [a])
    got3 = padded.prefill_cached([0, 1], [b, c], [len(a), 0])
    worst = max(worst, float(np.abs(got3 - want).max() / np.abs(want).max()))
g_reuse = greedy(reuse, [0, 2], got2.argmax(1))
g_whole = greedy(whole, [0, 1], want.argmax(1))
print("WORST", worst, "SAME", same, "GREEDY", bool((g_reuse == g_whole).all()))
assert worst < tol, worst
assert same == 2 and (g_reuse == g_whole).all(), (g_reuse, g_whole)
# a prompt riding inside a decode step (another slot's row), on top of its slot's cached prefix: the
# step computes only the new tokens, and its first token and KV are those of the prompt prefilled whole
mixed, alone = TorchEngine(path, **kw), TorchEngine(path, **kw)
if device == "cuda":
    mixed.warmup(); alone.warmup()
mixed.prefill(0, a)
mixed.release(0)
mixed.prefill(1, c)
step = mixed.decode_greedy_begin(np.array([1]), np.array([5]), prompts=(np.array([0]), [b], [len(a)]))
first = alone.prefill(0, b)
assert step.result()[1] == first.argmax() and mixed.length(0) == len(b), (step.result(), first.argmax())
x, y = mixed.decode(np.array([0]), np.array([7])), alone.decode(np.array([0]), np.array([7]))
worst = max(worst, float(np.abs(x - y).max() / np.abs(y).max()))
assert worst < tol, worst
for bad in ([len(b)], [len(b) - 1, 0]):  # nothing left to compute; a count per prompt
    try:
        mixed.decode_greedy_begin(np.array([1]), np.array([5]), prompts=(np.array([2]), [b], bad))
    except ValueError:
        continue
    raise AssertionError(f"cached counts {bad} accepted")
for bad in ((0, 1, 0), (3, 3, 5), (0, 1, 128)):
    try:
        reuse.copy_prefix(*bad)
    except ValueError:
        continue
    raise AssertionError(f"copy_prefix{bad} accepted")
try:
    reuse.prefill_cached([3], [c], [len(c)])
except ValueError as exc:
    assert "cached tokens" in str(exc)
else:
    raise AssertionError("a prompt with nothing left to compute was accepted")
"""


def _run(tmp_path, device: str, dtype: str, tol: float, env: dict) -> str:
    _, path = _random_model(tmp_path, "llama-rope-scaled")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(path), device, dtype, str(tol)], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_a_prompt_on_its_cached_prefix_equals_it_prefilled_whole_interpreted(tmp_path):
    pytest.importorskip("triton")
    print(_run(tmp_path, "cpu", "float32", 1e-5, {"TRITON_INTERPRET": "1"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (prefix reuse with bf16 and CUDA graphs)")
def test_a_prompt_on_its_cached_prefix_equals_it_prefilled_whole_on_the_gpu(tmp_path):
    # bf16 products over fewer rows may sum in another order: close, and the same greedy tokens
    print(_run(tmp_path, "cuda", "bfloat16", 0.02, {}))

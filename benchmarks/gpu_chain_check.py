"""GPU check of the scheduler's chained steps and the batched prefill (CUDA graphs, Triton kernels).

A seeded random Llama (float32, small) with the Llama-2 tokenizer: jobs of different lengths, more
than the slots, one token playing an end id. The answers with chained steps must equal the answers
without chaining and transformers' greedy `generate` on the same GPU. Prints OK or raises.
    python benchmarks/gpu_chain_check.py [SHARED]
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from tritonchat.build.synthetic import make_random_model
from tritonchat.python_backend.detokenize import TextTracker
from tritonchat.python_backend.engine_torch import TorchExecutor
from tritonchat.python_backend.sampling import SamplingParams
from tritonchat.python_backend.scheduler import Scheduler, Sequence


def run(ex, tok, jobs, end):
    sched = Scheduler(ex)
    got, done = {}, threading.Event()

    def sink_for(i):
        def sink(out):
            if out.final:
                got[i] = (out.finish_reason, out.num_output_tokens, out.release.window)
                if len(got) == len(jobs):
                    done.set()
        return sink

    for i, (prompt, n) in enumerate(jobs):
        sched.submit(Sequence(np.asarray(prompt), SamplingParams(max_tokens=n, end_ids=(end,)),
                              TextTracker(tok), sink_for(i)))
    assert done.wait(120)
    chained = sched.stats.chained
    sched.shutdown()
    return got, chained


def main():
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    root = Path(tempfile.mkdtemp())
    path = make_random_model("llama", root / "m", tokenizer="llama2", seed=3, shared=shared, layers=4, hidden=256,
                             heads=8, kv_heads=2, intermediate=512, max_positions=512)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: checks this script, not the GPU path
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(dev).eval()
    rng = np.random.default_rng(0)
    jobs = [(rng.integers(3, 32000, n).tolist(), m) for n, m in
            [(5, 40), (130, 25), (17, 60), (64, 15), (9, 33), (200, 50), (3, 44), (77, 20), (31, 70), (12, 9)]]
    ref = []
    for prompt, n in jobs:
        ids = torch.tensor([prompt], device=dev)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, eos_token_id=None)
        ref.append(out[0, len(prompt):].tolist())
    end = ref[2][20]  # a token the model does say, ~20 tokens into job 2, plays the end id
    ex = TorchExecutor(model=model, max_slots=4, max_seq_len=512, device=dev, dtype="float32")
    ex.warmup()
    chained, n_chained = run(ex, tok, jobs, end)
    ex.can_chain = False
    plain, _ = run(ex, tok, jobs, end)
    assert n_chained > 0
    for i, (prompt, n) in enumerate(jobs):
        want = ref[i][: ref[i].index(end)] if end in ref[i] else ref[i]
        reason, count, window = chained[i]
        assert chained[i] == plain[i], (i, chained[i], plain[i])
        assert window == want, (i, window, want)  # a non-streamed answer's release holds every id
        assert count == len(want) + (reason == "stop"), (i, count, len(want), reason)
    print(f"OK: {len(jobs)} jobs, chained steps {n_chained}, {ex.describe()['attention']} attention, "
          f"graphs {len(ex._graphs)}")


if __name__ == "__main__":
    main()

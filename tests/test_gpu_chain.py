"""GPU check of the scheduler's chained steps and the batched prefill (CUDA graphs, Triton kernels).

A seeded random Llama (float32, small) with the Llama-2 tokenizer: jobs of different lengths, more
than the slots, one token playing an end id, some jobs with `min_tokens` (the end id banned inside
the decode graph until then). The answers with chained steps (and prompts prefilled inside decode
steps) must equal the answers without chaining, without prompts in steps, and transformers' greedy
`generate` on the same GPU. Needs a CUDA GPU (skipped otherwise) and the shared Llama-2 tokenizer:
    python -m pytest -s tests/test_gpu_chain.py
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import SHARED, need_shared

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")


def run(ex, tok, jobs, end, mix_prefill=True, sample_on_device=True):
    """Each job (prompt, max_tokens, min_tokens[, other sampling parameters]) through a scheduler over
    `ex`: {job: (finish reason, tokens, ids)}, and the scheduler's stats."""
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler, Sequence

    sched = Scheduler(ex, mix_prefill=mix_prefill, sample_on_device=sample_on_device)
    got, done = {}, threading.Event()

    def sink_for(i):
        def sink(out):
            if out.final:
                got[i] = (out.finish_reason, out.num_output_tokens, out.release.window)
                if len(got) == len(jobs):
                    done.set()
        return sink

    for i, (prompt, n, m, *own) in enumerate(jobs):
        params = SamplingParams(max_tokens=n, min_tokens=m, end_ids=(end,), **(own[0] if own else {}))
        sched.submit(Sequence(np.asarray(prompt), params, TextTracker(tok), sink_for(i)))
    assert done.wait(120)
    stats = sched.stats
    sched.shutdown()
    return got, stats


def _model(tmp_path):
    """A seeded random Llama (float32, on the GPU) and its Llama-2 tokenizer."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from tritonchat.build.synthetic import make_random_model

    need_shared("tokenizers", "llama2", "tokenizer.model")
    path = make_random_model("llama", tmp_path / "m", tokenizer="llama2", seed=3, shared=SHARED, layers=4,
                             hidden=256, heads=8, kv_heads=2, intermediate=512, max_positions=512)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to("cuda").eval(), tok


def test_chained_steps_and_prompts_in_steps_equal_transformers_on_the_gpu(tmp_path):
    from tritonchat.python_backend.engines.torch import TorchEngine

    dev = "cuda"
    model, tok = _model(tmp_path)
    rng = np.random.default_rng(0)
    # (prompt, max_tokens, min_tokens): a min_tokens job bans the end id inside the decode graph
    jobs = [(rng.integers(3, 32000, n).tolist(), m, k) for n, m, k in
            [(5, 40, 0), (130, 25, 0), (17, 60, 0), (64, 15, 0), (9, 33, 0), (200, 50, 0), (3, 44, 0), (77, 20, 0),
             (31, 70, 0), (12, 9, 0), (17, 60, 30), (17, 60, 59), (5, 40, 12)]]

    def generate(prompt, n, m, end):
        ids = torch.tensor([prompt], device=dev)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=m, pad_token_id=0, eos_token_id=end)
        return out[0, len(prompt):].tolist()

    end = generate(jobs[2][0], 60, 60, None)[20]  # a token the model does say, ~20 tokens into job 2
    ref = [generate(prompt, n, m, end) for prompt, n, m in jobs]
    ex = TorchEngine(model=model, max_slots=4, max_seq_len=512, device=dev, dtype="float32")
    ex.warmup()
    chained, st = run(ex, tok, jobs, end)  # chained steps, prompts riding in decode steps
    unmixed, st2 = run(ex, tok, jobs, end, mix_prefill=False)
    ex.can_chain = False
    plain, _ = run(ex, tok, jobs, end, mix_prefill=False)
    n_chained = st.chained
    assert n_chained > 0 and st.mixed_steps > 0 and st2.mixed_steps == 0
    assert len(ref[2]) <= 21 < len(ref[10]), "the end id did not stop job 2, or min_tokens did not hold it off"
    for i, (prompt, n, m) in enumerate(jobs):
        want = ref[i][: ref[i].index(end)] if end in ref[i] else ref[i]
        reason, count, window = chained[i]
        assert chained[i] == plain[i] == unmixed[i], (i, chained[i], plain[i], unmixed[i])
        assert window == want, (i, window, want)  # a non-streamed answer's release holds every id
        assert count == len(want) + (reason == "stop"), (i, count, len(want), reason)
    # a cache longer than split_min: steps switch between the short span's graphs (attention in one
    # split) and the whole cache's (split, a combine kernel) as sequences grow past it
    spanned = TorchEngine(model=model, max_slots=4, max_seq_len=512, device=dev, dtype="float32")
    spanned.split_min = 64
    spanned.warmup()
    assert spanned._splits(4) > 1 and spanned._splits(4, 64) == 1
    both, _ = run(spanned, tok, jobs, end)
    assert {tb for _, tb in spanned.graphs.decode} == {64, None}
    assert both == chained, [i for i in range(len(jobs)) if both[i] != chained[i]]
    print(f"OK: {len(jobs)} jobs, chained steps {n_chained}, steps carrying prompts {st.mixed_steps} "
          f"({st.prefills} prompts, {st.prefill_calls} prefills of their own), {ex.describe()['attention']} "
          f"attention, graphs {len(ex.graphs.decode)} + {len(ex.graphs.mixed)} carrying prompts")


def test_sampled_requests_drawn_on_the_gpu_equal_the_hosts_draws(tmp_path):
    """Seeded sampled requests (temperature, top_k, top_p; some under `min_tokens`; one with repetition
    and frequency penalties) and a greedy one with repetition and presence penalties among greedy ones,
    more than the slots: chosen in the decode graphs' steps on the GPU (chained, prompts riding in
    steps; the penalties from the engine's token counts) they give the answers the host's sampler
    gives from the same logits (`sample_on_device` off: every step with such a row brings its logits
    to the host)."""
    from tritonchat.python_backend.engines.torch import TorchEngine

    model, tok = _model(tmp_path)
    rng = np.random.default_rng(1)
    kinds = [{"temperature": 0.8, "seed": 1}, {"temperature": 1.0, "top_p": 0.9, "seed": 2}, {},
             {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "seed": 3}, {"temperature": 1.5, "top_k": 5, "seed": 4},
             {"temperature": 0.9, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "seed": 5},
             # a random model's greedy answer seldom repeats a token: a penalty below 1 (seen tokens' positive
             # logits multiplied by 20) makes the penalties bite
             {"repetition_penalty": 0.05, "presence_penalty": 0.4}]
    jobs = [(rng.integers(3, 32000, n).tolist(), m, k, kinds[i % len(kinds)]) for i, (n, m, k) in
            enumerate([(5, 40, 0), (130, 25, 10), (17, 60, 0), (64, 15, 0), (9, 33, 20), (200, 50, 0), (3, 44, 0),
                       (77, 20, 0), (31, 70, 0), (12, 9, 0)])]
    ex = TorchEngine(model=model, max_slots=4, max_seq_len=512, device="cuda", dtype="float32")
    ex.warmup()
    end = 13  # an id a random model says now and then (stops some sampled answers early)
    drawn, st = run(ex, tok, jobs, end)
    host, st2 = run(ex, tok, jobs, end, sample_on_device=False)
    greedy, _ = run(ex, tok, [(p, n, m) for p, n, m, _ in jobs], end)
    assert st.chained > 0 and st.mixed_steps > 0
    assert drawn == host, [i for i in range(len(jobs)) if drawn[i] != host[i]]
    sampled = [i for i, job in enumerate(jobs) if job[3]]
    assert all(drawn[i] != greedy[i] for i in sampled)
    assert all(drawn[i] == greedy[i] for i in range(len(jobs)) if not jobs[i][3])
    print(f"OK: {len(sampled)} sampled jobs drawn on the GPU as on the host; chained steps {st.chained} "
          f"(host-sampled run: {st2.chained}), steps carrying prompts {st.mixed_steps}")

"""TorchEngine on CPU (float32, no CUDA graphs) against transformers itself.

Greedy generation through the engine, with sequences joining at different steps over 3 slots and
a released slot reused, must equal `generate(do_sample=False)` token for token; every logits row the
engine returns must be close to the HF forward over the whole sequence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
import torch

from tritonchat.python_backend.engines.torch import TorchEngine

STORIES = SHARED / "models" / "stories260K"
N_NEW = 12
# (prompt length, step at which it joins); the 4th prompt takes the slot the 1st one leaves
PLAN = [(5, 0), (9, 2), (3, 5), (7, 14)]


def _prompts(vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).astype(np.int64) for n, _ in PLAN]


def _run_staggered(ex: TorchEngine, prompts):
    """Greedy decode the prompts through `ex`; returns tokens and logits rows for each prompt."""
    joins = {step: i for i, (_, step) in enumerate(PLAN)}
    free = list(range(ex.max_slots))
    slot_of, toks, rows = {}, {i: [] for i in range(len(prompts))}, {i: [] for i in range(len(prompts))}
    step = 0
    while step < 100 and (len(slot_of) or step <= max(joins)):
        if step in joins:
            i = joins[step]
            slot_of[i] = free.pop(0)
            logits = ex.prefill(slot_of[i], prompts[i])
            assert ex.length(slot_of[i]) == len(prompts[i])
            rows[i].append(logits)
            toks[i].append(int(np.argmax(logits)))
        live = [i for i in slot_of if len(toks[i]) < N_NEW]
        if live:
            logits = ex.decode(np.array([slot_of[i] for i in live]), np.array([toks[i][-1] for i in live]))
            assert logits.shape == (len(live), ex.vocab_size) and logits.dtype == np.float32
            for r, i in enumerate(live):
                rows[i].append(logits[r])
                toks[i].append(int(np.argmax(logits[r])))
        for i in [i for i in slot_of if len(toks[i]) >= N_NEW]:
            ex.release(slot_of[i])
            assert ex.length(slot_of[i]) == 0
            free.append(slot_of.pop(i))
        step += 1
    return toks, rows


def _check_against_hf(model, ex, vocab):
    prompts = _prompts(vocab)
    toks, rows = _run_staggered(ex, prompts)
    model.generation_config.eos_token_id = None
    worst = 0.0
    for i, p in enumerate(prompts):
        ids = torch.from_numpy(p)[None]
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=N_NEW, min_new_tokens=0, pad_token_id=0)
        ref_new = ref[0, len(p):].tolist()
        assert toks[i] == ref_new, f"prompt {i}: engine {toks[i]} != HF {ref_new}"
        # logits rows against one HF forward over prompt + generated tokens
        with torch.no_grad():
            full = model(ref[:, : len(p) + N_NEW - 1]).logits[0, len(p) - 1:].float().numpy()
        got = np.stack(rows[i])
        assert got.shape == full.shape
        worst = max(worst, float(np.abs(got - full).max()))
    print(f"max |logits - HF| = {worst:.2e}")
    assert worst < 2e-4, f"max |logits - HF| = {worst}"
    return worst


def _engine(path, **kw):
    return TorchEngine(str(path), max_slots=3, max_seq_len=64, device="cpu", dtype="float32",
                         cuda_graphs=False, **kw)


@pytest.mark.skipif(not STORIES.exists(), reason="stories260K not present")
def test_stories260k_matches_hf_generate():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    ex = _engine(STORIES)
    assert ex.describe()["path"] == "native" and ex.kernels == "torch"
    _check_against_hf(model, ex, model.config.vocab_size)


def _random_model(tmp_path: Path, arch: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False)
        model = tf.Qwen3ForCausalLM(cfg)
    elif arch == "llama-rope-scaled":
        cfg = tf.LlamaConfig(**common, attention_bias=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # HF zero-initialises biases and norms: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        # sharper distributions than the 0.02 init, so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.eval()
    model.save_pretrained(tmp_path / arch)
    return model, tmp_path / arch


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama-rope-scaled"])
def test_random_model_matches_hf_generate(tmp_path, arch):
    model, path = _random_model(tmp_path, arch)
    ex = _engine(path)
    assert ex.describe()["path"] == "native"
    if arch == "qwen2":
        assert ex.layers[0].bqkv is not None  # q/k/v biases are read
    _check_against_hf(model, ex, 512)


def test_gpt2_uses_hf_fallback(tmp_path):
    model, path = _random_model(tmp_path, "gpt2")
    with pytest.warns(UserWarning, match="fallback"):
        ex = _engine(path)
    assert ex.describe()["path"] == "hf-fallback"
    _check_against_hf(model, ex, 512)
    # the fallback bans by indexing too: the banned row's best id is never chosen
    from tritonchat.python_backend.engines.base import Ban

    for s in (0, 1):
        ex.release(s)
    ex.prefill_batch([0, 1], [np.arange(3, 8), np.arange(5, 9)])
    logits = ex.decode(np.array([0, 1]), np.array([7, 8]))
    for s in (0, 1):
        ex.release(s)
    ex.prefill_batch([0, 1], [np.arange(3, 8), np.arange(5, 9)])
    got = ex.decode_greedy(np.array([0, 1]), np.array([7, 8]), ban=Ban(np.array([1]), np.array([logits[1].argmax()])))
    second = np.argsort(logits[1])[-2]
    assert got.tolist() == [logits[0].argmax(), second]


def test_prefill_and_decode_errors(tmp_path):
    model, path = _random_model(tmp_path, "qwen2")
    ex = TorchEngine(str(path), max_slots=2, max_seq_len=8, device="cpu", dtype="float32", cuda_graphs=False)
    with pytest.raises(ValueError):
        ex.prefill(0, np.arange(8))  # n + 1 > max_seq_len
    with pytest.raises(ValueError):
        ex.prefill(2, np.arange(3))  # no such slot
    ex.prefill(0, np.arange(6))
    ex.decode(np.array([0]), np.array([1]))  # writes position 6
    ex.decode(np.array([0]), np.array([1]))  # writes position 7, the last
    assert ex.length(0) == 8
    with pytest.raises(ValueError):
        ex.decode(np.array([0]), np.array([1]))  # cache full
    with pytest.raises(ValueError):
        ex.decode(np.array([1, 1]), np.array([1, 2]))  # duplicate slots
    assert ex.decode(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (0, 512)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_batched_prefill_equals_one_at_a_time(tmp_path, arch):
    """Prompts of different lengths prefilled in one call (packed, right-padded attention) give the
    logits and the cache of separate prefills: the decode steps after them agree too."""
    model, path = _random_model(tmp_path, arch)
    kw = dict(max_slots=4, max_seq_len=64, device="cpu", dtype="float32", cuda_graphs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt2: the fallback warns
        one, many = TorchEngine(str(path), **kw), TorchEngine(str(path), **kw)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 512, n) for n in (7, 1, 19, 4)]
    slots = [2, 0, 3, 1]
    ref = np.stack([one.prefill(s, p) for s, p in zip(slots, prompts)])
    got = many.prefill_batch(slots, prompts)
    assert got.shape == (4, 512)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert [many.length(s) for s in slots] == [len(p) for p in prompts]
    toks = ref.argmax(-1)
    for _ in range(3):
        a, b = one.decode(np.array(slots), toks), many.decode(np.array(slots), toks)
        np.testing.assert_allclose(b, a, atol=2e-5)
        toks = a.argmax(-1)
    with pytest.raises(ValueError):
        many.prefill_batch([0, 0], prompts[:2])  # one slot twice


def test_padded_prefill_of_the_graphs_equals_the_packed_one(tmp_path):
    """The prefill that CUDA graphs capture runs on padded buckets (tokens, prompts, width; padding
    written to the dummy slot). Run eagerly here, on CPU: the same logits and cache as the packed
    prefill, nothing written outside the prompts' own slots but the dummy slot."""
    model, path = _random_model(tmp_path, "qwen2")
    kw = dict(max_slots=6, max_seq_len=64, device="cpu", dtype="float32", cuda_graphs=False)
    packed, padded = TorchEngine(str(path), **kw), TorchEngine(str(path), **kw)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 512, n) for n in (7, 1, 19)]
    slots, lens = [2, 0, 4], np.array([7, 1, 19])
    ref = packed.prefill_batch(slots, prompts)
    key = padded._prefill_buckets(lens)
    assert key == (64, 4, 32)  # 27 tokens -> 64, 3 prompts -> 4, longest 19 -> 32
    # above PREFILL_TOKEN_STEP (256) tokens go up in steps of it, not to the next power of two
    assert padded._prefill_buckets(np.array([128] * 9)) == (1280, 16, 64)  # the context (64) caps the width
    assert padded._prefill_buckets(np.array([100, 200])) == (512, 2, 64)
    assert padded._prefill_buckets(np.array([128, 128])) == (256, 2, 64)
    assert list(padded._warmup_prefill_keys()) == [(64, 1, 16), (64, 1, 32)]  # one prompt per width bucket
    buf = torch.from_numpy(padded._prefill_layout(slots, prompts, lens, key))
    with torch.no_grad():
        got = padded._prefill_body(buf, key)[:3].numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)
    padded._lengths[slots] = lens
    for L in padded.layers:  # slots 1, 3, 5 hold nothing: no padding leaked into them
        assert not L.kc[[1, 3, 5]].any() and not L.vc[[1, 3, 5]].any()
    toks = ref.argmax(-1)
    for _ in range(3):
        a, b = packed.decode(np.array(slots), toks), padded.decode(np.array(slots), toks)
        np.testing.assert_allclose(b, a, atol=2e-5)
        toks = a.argmax(-1)


def test_decode_greedy_ban(tmp_path):
    """`ban` masks the given ids in the given rows only (min_tokens on the device)."""
    from tritonchat.python_backend.engines.base import Ban

    _, path = _random_model(tmp_path, "qwen2")
    kw = dict(max_slots=2, max_seq_len=32, device="cpu", dtype="float32", cuda_graphs=False)
    a, b = TorchEngine(str(path), **kw), TorchEngine(str(path), **kw)
    for ex in (a, b):
        ex.prefill_batch([0, 1], [np.arange(5), np.arange(3, 9)])
    slots, toks = np.array([0, 1]), np.array([7, 8])
    logits = a.decode(slots, toks)
    top = logits.argmax(-1)
    got = b.decode_greedy(slots, toks, ban=Ban(rows=np.array([1]), ids=np.array([top[1], 5])))
    masked = logits[1].copy()
    masked[[top[1], 5]] = -np.inf
    assert got.tolist() == [top[0], masked.argmax()]
    # more ids than the step's input rows hold (BAN_IDS) are banned after the step: same answer
    from tritonchat.python_backend.engines.torch.layout import BAN_IDS

    many = np.argsort(logits[0])[::-1][: BAN_IDS + 3].copy()  # row 0's best ids
    for ex in (a, b):
        ex._lengths[:] = [5, 6]  # the same step again
    got = b.decode_greedy(slots, toks, ban=Ban(rows=np.array([0]), ids=many))
    assert got.tolist() == [np.argsort(logits[0])[::-1][BAN_IDS + 3], top[1]]


def test_chained_steps_take_the_previous_ids_on_the_device(tmp_path):
    """A chained greedy step reads the ids of the step launched just before it (`_last_ids`); a
    chain to an older step falls back to that step's ids from the host. Both equal plain steps."""
    _, path = _random_model(tmp_path, "qwen3")
    kw = dict(max_slots=3, max_seq_len=32, device="cpu", dtype="float32", cuda_graphs=False)
    plain, chained = TorchEngine(str(path), **kw), TorchEngine(str(path), **kw)
    slots = np.array([2, 0])
    for ex in (plain, chained):
        ex.prefill_batch([2, 0], [np.arange(4), np.arange(3, 9)])
    want = [np.array([7, 8])]
    for _ in range(4):
        want.append(plain.decode_greedy(slots, want[-1]))
    step = chained.decode_greedy_begin(slots, want[0])
    got = []
    for _ in range(3):
        nxt = chained.decode_greedy_begin(slots, None, chain=step)
        got.append(step.result().tolist())
        step = nxt
    got.append(step.result().tolist())
    assert got == [w.tolist() for w in want[1:]]
    # chain to a step that is not the last launched: its ids come from the host
    for ex in (plain, chained):
        for s in (0, 2):
            ex.release(s)
        ex.prefill_batch([2, 0], [np.arange(4), np.arange(3, 9)])
    first = chained.decode_greedy_begin(slots, want[0])
    chained.decode_greedy_begin(np.array([1]), np.array([3]))  # another step in between
    chained.release(1)
    second = chained.decode_greedy_begin(slots, None, chain=first)
    assert second.result().tolist() == want[2].tolist()
    assert chained.decode_greedy_begin(np.zeros(0, np.int64)).result().tolist() == []  # an empty step


def test_prompts_ride_in_a_decode_step(tmp_path):
    """`decode_greedy_begin(prompts=...)`: new prompts prefilled inside a decode step give the
    logits, first tokens and cache of a separate prefill, the decode rows those of a plain step;
    the next step chains over the new row set (the prompts' first tokens taken on the device); a
    ban reaches a prompt's row. The padded form a CUDA graph runs (spare decode and prompt
    columns, prompts padded to a token bucket) gives the same and writes only the dummy slot."""
    from tritonchat.python_backend.engines.torch.layout import MIX_PROMPTS
    from tritonchat.python_backend.engines.base import Ban

    _, path = _random_model(tmp_path, "qwen3")
    kw = dict(max_slots=6, max_seq_len=64, device="cpu", dtype="float32", cuda_graphs=False)
    plain, mixed, padded = (TorchEngine(str(path), **kw) for _ in range(3))
    rng = np.random.default_rng(7)
    old = [rng.integers(0, 512, n) for n in (6, 11)]
    new = [rng.integers(0, 512, n) for n in (9, 1, 14)]
    slots, pslots = np.array([2, 0]), np.array([4, 1, 5])
    for ex in (plain, mixed, padded):
        ex.prefill_batch(slots, old)
    toks = np.array([17, 42])
    ref_prefill = plain.prefill_batch(pslots, new)
    ref_decode = plain.decode(slots, toks)
    first = ref_prefill.argmax(-1)
    banned = ref_prefill[1].copy()
    banned[first[1]] = -np.inf
    ban = Ban(rows=np.array([3]), ids=np.array([first[1]]))  # row 3: the second prompt
    step = mixed.decode_greedy_begin(slots, toks, ban, prompts=(pslots, new))
    assert step.result().tolist() == ref_decode.argmax(-1).tolist() + [first[0], banned.argmax(), first[2]]
    assert step.slots.tolist() == [2, 0, 4, 1, 5]
    assert [mixed.length(s) for s in (2, 0, 4, 1, 5)] == [7, 12, 9, 1, 14]
    # the next step chains over every row, the new ones included, in another order
    rows = np.array([0, 1, 2, 4, 5])
    last = dict(zip(step.slots.tolist(), step.result().tolist()))
    nxt = mixed.decode_greedy_begin(rows, None, chain=step)
    assert nxt.result().tolist() == plain.decode_greedy(rows, np.array([last[s] for s in rows])).tolist()
    with pytest.raises(ValueError, match="did not write"):
        mixed.decode_greedy_begin(np.array([3]), None, chain=nxt)
    with pytest.raises(ValueError, match="not among the decode rows"):
        mixed.decode_greedy_begin(slots, toks, prompts=(np.array([2]), new[:1]))
    with pytest.raises(ValueError, match="at most"):
        mixed.decode_greedy_begin(slots, toks, prompts=(np.arange(MIX_PROMPTS + 1), [[1]] * (MIX_PROMPTS + 1)))

    # the padded form of the graphs: 4 decode columns (2 spare), prompts padded to a bucket
    lens = np.array([len(p) for p in new])
    key = padded._prefill_buckets(lens)
    assert key == (64, 4, 16) and padded._mix_cols(key) == 4
    cols = 4
    a = np.empty((12, cols + 4), np.int64)
    padded._step_inputs(a, 2, slots, toks, padded._lengths[slots], False, None, cols, pslots)
    buf = torch.from_numpy(padded._prefill_layout(pslots, new, lens, key, mixed=True))
    with torch.no_grad():
        logits, ids = padded._step_body(torch.from_numpy(a), 64, (buf, key))
    np.testing.assert_allclose(logits[:2].numpy(), ref_decode, atol=2e-5)
    np.testing.assert_allclose(logits[cols:cols + 3].numpy(), ref_prefill, atol=2e-5)
    assert ids[cols:cols + 3].tolist() == first.tolist()
    assert padded._last_ids[pslots].tolist() == first.tolist()  # per slot, for the next chained step
    for L in padded.layers:  # slot 3 holds nothing: no padding leaked into it
        assert not L.kc[3].any() and not L.vc[3].any()


_INTERPRETED = r"""
import sys, numpy as np, torch
from tritonchat.python_backend.engines.torch import TorchEngine
path, = sys.argv[1:]
kw = dict(max_slots=3, max_seq_len=96, device="cpu", dtype="float32", cuda_graphs=False)
ref = TorchEngine(path, kernels="torch", attention="sdpa", **kw)
tri = TorchEngine(path, kernels="triton", attention="triton", **kw)
one = TorchEngine(path, kernels="triton", attention="triton", **kw)
one._sms = 1  # as if the batch filled every SM: decode attention in one split, no combine kernel
tri.split_min = 0  # a 96-position cache would not be split: split it, the combine kernel runs
few = TorchEngine(path, kernels="triton", attention="triton", **kw)
few._sms = 1024  # a few rows, a short cache: one split of longer key blocks
assert tri._splits(3) > 1 and one._splits(3) == 1 and few._splits(3) == 1
rng = np.random.default_rng(1)
worst = 0.0
for slot, n in enumerate([5, 70, 33]):
    p = rng.integers(0, 512, n)
    r = ref.prefill(slot, p)
    worst = max(worst, *(np.abs(r - ex.prefill(slot, p)).max() for ex in (tri, one, few)))
for _ in range(3):
    slots = np.array([2, 0, 1]); toks = rng.integers(0, 512, 3)
    r = ref.decode(slots, toks)
    worst = max(worst, *(np.abs(r - ex.decode(slots, toks)).max() for ex in (tri, one, few)))
ps = [rng.integers(0, 512, n) for n in (9, 40, 2)]
for s in range(3):
    ref.release(s); tri.release(s)
worst = max(worst, np.abs(ref.prefill_batch([1, 2, 0], ps) - tri.prefill_batch([1, 2, 0], ps)).max())
# the varlen prefill as a graph runs it: padded to a token bucket, spare query blocks doing nothing
for s in range(3):
    ref.release(s); tri.release(s)
lens = np.array([len(p) for p in ps])
key = tri._prefill_buckets(lens)
assert key == (64,), key  # Triton attention: the token count is the whole key
assert list(tri._warmup_prefill_keys()) == [(64,), (128,), (256,)] + [(t,) for t in range(512, 2049, 256)]
buf = torch.from_numpy(tri._prefill_layout([2, 0, 1], ps, lens, key))
with torch.no_grad():
    got = tri._prefill_body(buf, key)[:3].numpy()
worst = max(worst, np.abs(ref.prefill_batch([2, 0, 1], ps) - got).max())
# a decode step carrying prompts, in the padded form a graph runs: one decode row (of two
# columns), two prompts (of three columns) in a 64-token bucket = a plain step + a prefill
for s in range(3):
    ref.release(s); tri.release(s)
ref.prefill(0, ps[0]); tri.prefill(0, ps[0])
lens = lens[1:]
key = tri._prefill_buckets(lens)
a = np.empty((12, 2 + tri._mix_cols(key)), np.int64)
tri._step_inputs(a, 1, np.array([0]), np.array([5]), tri._lengths[[0]], False, None, 2, np.array([1, 2]))
buf = torch.from_numpy(tri._prefill_layout(np.array([1, 2]), ps[1:], lens, key, mixed=True))
with torch.no_grad():
    logits, _ = tri._step_body(torch.from_numpy(a), None, (buf, key))
rp, rd = ref.prefill_batch([1, 2], ps[1:]), ref.decode(np.array([0]), np.array([5]))
worst = max(worst, np.abs(rd - logits[:1].numpy()).max(), np.abs(rp - logits[2:4].numpy()).max())
# a cache longer than split_min: steps whose sequences all fit in split_min read a span of it with no
# split (a graph of their own on a GPU), the others the whole cache, split; both as the torch ops
kw320 = {**kw, "max_seq_len": 320}
ref, span = TorchEngine(path, kernels="torch", attention="sdpa", **kw320), \
    TorchEngine(path, kernels="triton", attention="triton", **kw320)
span.split_min = 40
assert span._attn_span(40) == 40 and span._attn_span(41) is None and span._splits(2, 40) == 1 and span._splits(2) > 1
for slot, n in ((0, 150), (1, 20)):
    p = rng.integers(0, 512, n)
    worst = max(worst, np.abs(ref.prefill(slot, p) - span.prefill(slot, p)).max())
for rows in ([0, 1], [1], [1], [0, 1]):  # 151 positions: the whole cache; slot 1 alone: within 40
    slots, toks = np.array(rows), rng.integers(0, 512, len(rows))
    worst = max(worst, np.abs(ref.decode(slots, toks) - span.decode(slots, toks)).max())
print("WORST", worst)
assert worst < 1e-4, worst
"""


def test_triton_kernels_interpreted(tmp_path):
    """The Triton kernels, run by Triton's CPU interpreter, agree with the torch ops (skipped without Triton)."""
    pytest.importorskip("triton")
    _, path = _random_model(tmp_path, "qwen2")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = _INTERPRETED
    r = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout.strip().splitlines()[-1])

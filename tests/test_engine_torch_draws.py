"""Sampled tokens drawn by the torch engine (engines/torch/sample.py) against the host's definition
(`engines.base.draw_tokens`, `engines.base.penalize`), on CPU in float32: the draw alone over logits
with ties, bans and every parameter, penalties from the engine's token counts, then a decode step with
drawn rows, prompts it carries and a ban, and the chained step after it, against a plain engine's
logits drawn on the host; then penalised sequences over chained steps against the host's sampler."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_engine_torch import _random_model
from tritonchat.python_backend.engines.base import NONFINITE, Ban, Draws, draw_tokens, penalize
from tritonchat.python_backend.engines.torch import TorchEngine
from tritonchat.python_backend.engines.torch.sample import (DRAW_IN, DrawInputs, TokenCounts, draw, draw_packed,
                                                            pack_draws)


def _draws(rng, n: int, vocab: int) -> Draws:
    return Draws(np.arange(n, dtype=np.int64), rng.choice([0.3, 0.7, 1.0, 1.6], n).astype(np.float32),
                 rng.choice([0, 0, 1, 5, 40, vocab - 1, vocab], n).astype(np.int64),
                 rng.choice([1.0, 1.0, 0.5, 0.9, 0.95], n).astype(np.float32), rng.random(n))


def test_draw_on_the_device_equals_the_hosts():
    """Many rows of every kind: sharp and flat logits, ties (rounded logits), banned (-inf) ids, top_k
    off / 1 / some / the whole vocabulary, top_p off or on; each token equals the host's draw."""
    rng = np.random.default_rng(11)
    n, vocab = 400, 300
    logits = (rng.standard_normal((n, vocab)) * rng.choice([0.2, 1.0, 4.0], (n, 1))).astype(np.float32)
    logits[::3] = np.round(logits[::3], 1)  # ties, whose order is the lower id first on both sides
    logits[rng.random((n, vocab)) < 0.05] = -np.inf
    d = _draws(rng, n, vocab)
    want = draw_tokens(logits.copy(), d)
    taken, fed = draw(torch.from_numpy(logits), DrawInputs(d, d.rows, torch.device("cpu")))
    assert taken.tolist() == want.tolist() == fed.tolist()
    slots = np.arange(n) * 2  # the graphs' form: the same tokens, and each row's slot gets it
    assert _packed(logits, d, d.rows, slots, None) == (want.tolist(),) * 3
    # top_p 1 keeps the whole tail: one logit holding all but ~1e-9 of the mass, u just below 1
    sharp = np.full((1, vocab), -25.0, np.float32)
    sharp[0, 3] = 0.0
    tail = Draws(np.zeros(1, np.int64), np.ones(1, np.float32), np.zeros(1, np.int64), np.ones(1, np.float32),
                 np.array([1 - 1e-12]))
    got = draw(torch.from_numpy(sharp), DrawInputs(tail, tail.rows, torch.device("cpu")))[0].tolist()
    assert got == draw_tokens(sharp.copy(), tail).tolist() and got[0] > 3
    # the draws follow u: sorted u over one row give tokens in id order (the cumulative sum is by id)
    row = np.repeat(logits[:1], 50, axis=0)
    u = np.sort(rng.random(50))
    one = Draws(np.arange(50), np.full(50, 1.0, np.float32), np.zeros(50, np.int64), np.ones(50, np.float32), u)
    got = draw(torch.from_numpy(row), DrawInputs(one, one.rows, torch.device("cpu")))[0].tolist()
    assert got == sorted(got) and len(set(got)) > 5


def _penalize(counts, z, d):
    return counts.penalize(z, d.slots, d.repetition, d.presence, d.frequency, d.kinds)


def _packed(logits: np.ndarray, d: Draws, cols, slots, counts, pad: int = 5, dummy: int = 999):
    """`draw_packed` (the CUDA graphs' form) over `d`, padded with `pad` rows: (taken, fed, last ids)
    of the real rows."""
    a = np.empty((DRAW_IN, len(cols) + pad), np.int64)
    pack_draws(a, d, np.asarray(cols), np.asarray(slots), dummy)
    inp = torch.from_numpy(a)
    last = torch.full((dummy + 1,), -5, dtype=torch.int64)
    taken, fed = draw_packed(torch.from_numpy(logits).index_select(0, inp[0]), inp, counts, last)
    m = len(cols)
    return taken[:m].tolist(), fed[:m].tolist(), last[torch.from_numpy(np.asarray(slots))].tolist()


def test_penalties_on_the_device_equal_the_hosts():
    """Rows with repetition, presence and frequency penalties (alone, together, none), greedy
    (temperature 0) and sampled, over logits of both signs with ties and bans, their slots' counts
    made by `track` (the prompt) and `count` (the tokens fed, chained ones read from the last ids):
    each token equals the host's `penalize` then `draw_tokens`, bitwise on the penalised logits."""
    rng = np.random.default_rng(3)
    n, vocab, cpu = 60, 97, torch.device("cpu")
    counts = TokenCounts(n + 1, vocab, cpu)
    seen, made = np.zeros((n, vocab), bool), np.zeros((n, vocab), np.int32)
    last = torch.from_numpy(rng.integers(0, vocab, n + 1))
    for slot in range(n):  # slot n: the dummy one, never tracked
        prompt = rng.integers(0, vocab, int(rng.integers(1, 30)))
        counts.track(slot, prompt)
        seen[slot, prompt] = True
    for _ in range(12):  # decode steps over some of the slots, half of them chained
        slots = np.sort(rng.choice(n, int(rng.integers(1, n)), replace=False))
        chained = rng.random() < 0.5
        toks = last.numpy()[slots] if chained else rng.integers(0, vocab, len(slots))
        counts.count(slots, None if chained else toks, last)
        np.add.at(made, (slots, toks), 1)
        seen[slots, toks] = True
        last = torch.from_numpy(rng.integers(0, vocab, n + 1))
    assert (counts.counts[:n].numpy() == made).all() and not counts.counts[n].any()
    logits = (rng.standard_normal((n, vocab)) * 3).astype(np.float32)
    logits[::4] = np.round(logits[::4])
    logits[rng.random((n, vocab)) < 0.03] = -np.inf
    pen = np.stack([rng.choice([1.0, 1.0, 1.3, 0.7, 2.0], n), rng.choice([0.0, 0.4, -1.5], n),
                    rng.choice([0.0, 0.25, 1.1, -0.6], n)])
    pen[:, :3] = [[1.3, 1.0, 1.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.8]]  # each penalty alone
    d = _draws(rng, n, vocab)
    d = Draws(d.rows, np.where(rng.random(n) < 0.3, 0, d.temperature).astype(np.float32), d.top_k, d.top_p,
              d.u, pen)
    host = np.stack([penalize(logits[i].copy(), seen[i], made[i], *pen[:, i]) for i in range(n)])
    want = draw_tokens(host.copy(), d)
    order = rng.permutation(n)  # rows in another order than their slots
    dd = Draws(*(a[order] for a in (d.rows, d.temperature, d.top_k, d.top_p, d.u)), pen[:, order])
    inputs = DrawInputs(dd, order, cpu, order)
    assert _penalize(counts, torch.from_numpy(logits).index_select(0, inputs.cols), inputs).numpy().tobytes() \
        == host[order].tobytes()
    taken, fed = draw(torch.from_numpy(logits), inputs, counts)
    assert taken.tolist() == want[order].tolist() == fed.tolist()
    assert _packed(logits, dd, order, order, counts, dummy=n) == (want[order].tolist(),) * 3  # the graphs' form
    assert (want != np.array([draw_tokens(logits[[i]].copy(), Draws(*(a[[i]] for a in (
        d.rows, d.temperature, d.top_k, d.top_p, d.u))))[0] for i in range(n)])).sum() > n // 10  # they bite
    greedy = d.temperature == 0
    assert (want[greedy] == host[greedy].argmax(-1)).all() and greedy.sum() > 5
    for k in range(3):  # one kind of penalty alone (the others skipped)
        only = np.array([p if j == k else np.full(n, q) for j, (p, q) in enumerate(zip(pen, (1.0, 0.0, 0.0)))])
        one = Draws(dd.rows, dd.temperature, dd.top_k, dd.top_p, dd.u, only[:, order])
        want_k = [penalize(logits[i].copy(), seen[i], made[i], *only[:, i]) for i in order]
        got = _penalize(counts, torch.from_numpy(logits[order]), DrawInputs(one, order, cpu, order))
        assert got.numpy().tobytes() == np.stack(want_k).tobytes(), k
    # every row greedy: the argmax of the penalised logits alone (no row sorted)
    zero = Draws(dd.rows, np.zeros(n, np.float32), dd.top_k, dd.top_p, np.zeros(n), dd.penalties)
    taken, fed = draw(torch.from_numpy(logits), DrawInputs(zero, order, cpu, order), counts)
    assert taken.tolist() == host[order].argmax(-1).tolist() == fed.tolist()
    assert _packed(logits, zero, order, order, counts, dummy=n)[0] == taken.tolist()


def test_the_hosts_partial_nucleus_equals_a_full_sort():
    """`_nucleus` sorts only the largest candidates by a packed key: its mask equals the prefix of a
    full stable sort by descending logit whose integer weight before each token is under the mass,
    over negative and positive logits, ties, +0 and -0, flat and peaked rows."""
    from tritonchat.python_backend.engines.base import _nucleus, weights

    rng = np.random.default_rng(8)
    for scale in (0.05, 1.0, 6.0, 30.0):
        for _ in range(20):
            z = (rng.standard_normal(3000) * scale - rng.random()).astype(np.float32)
            z[:50] = np.round(z[:50], 1)  # ties
            z[50:53] = [0.0, -0.0, 0.0]
            w = weights(z, z.max(), 3000)
            mass = float(rng.choice([0.1, 0.5, 0.9, 0.95, 0.999])) * float(w.sum())
            order = np.argsort(-z.astype(np.float64), kind="stable")  # -0 and +0 as equals
            sw = w[order]
            want = np.zeros(3000, bool)
            want[order[np.cumsum(sw) - sw < mass]] = True
            assert (_nucleus(w, mass, z) == want).all(), (scale, mass)


_KERNEL_RUN = r"""
import sys
import numpy as np, torch
from tritonchat.python_backend.engines.base import NONFINITE, Draws, draw_tokens
from tritonchat.python_backend.engines.torch import TorchEngine
from tritonchat.python_backend.engines.torch.draw_kernel import BLOCK, for_engine, launch
from tritonchat.python_backend.engines.torch.sample import DRAW_IN, DrawInputs, draw, draw_packed, pack_draws

kernel = for_engine(True)
assert kernel is launch and for_engine(False) is None
rng = np.random.default_rng(5)
for n, vocab in ((70, BLOCK + 904), (30, 300)):  # rows of two blocks and of less than one
    logits = (rng.standard_normal((n, vocab)) * rng.choice([0.2, 1.0, 4.0, 12.0, 40.0], (n, 1))).astype(np.float32)
    logits[::3] = np.round(logits[::3], 1)  # ties, inside and at the nucleus' edge
    logits[rng.random((n, vocab)) < 0.05] = -np.inf
    logits[1:4] = 0.0  # one tie of every id: the kept ones are the lowest ids
    logits[5, 100:110] = [0.0, -0.0] * 5
    logits[7] = -np.inf  # nothing to draw
    logits[8, 3] = np.nan
    d = Draws(np.arange(n), rng.choice([0.3, 0.7, 1.0, 1.6], n).astype(np.float32),
              rng.choice([0, 0, 1, 5, 40, vocab - 1, vocab], n).astype(np.int64),
              rng.choice([1.0, 1.0, 0.5, 0.9, 0.95, 1e-30], n).astype(np.float32), rng.random(n))
    d.top_p[1:4] = [0.5, 0.31, 0.999]
    d.u[1] = 0.9999  # the last of the lower half: top_p 0.5 of an even row ends where the weight before is the mass
    d.top_k[1:4] = 0
    plain = Draws(d.rows, d.temperature, np.zeros(n, np.int64), np.ones(n, np.float32), d.u)  # temperature alone
    assert d.ordered and not plain.ordered
    for dd in (d, plain):  # sorted rows; nothing sorted
        want = []
        for i in range(n):
            try:
                want.append(int(draw_tokens(logits[[i]].copy(), Draws(*(a[[i]] for a in (
                    dd.rows, dd.temperature, dd.top_k, dd.top_p, dd.u))))[0]))
            except ValueError:
                want.append(NONFINITE)
        inp = DrawInputs(dd, dd.rows, torch.device("cpu"))
        ops = draw(torch.from_numpy(logits), inp)
        taken, fed = draw(torch.from_numpy(logits), inp, kernel=kernel)
        assert want == ops[0].tolist() == taken.tolist(), [(i, a, b, c) for i, (a, b, c) in enumerate(
            zip(want, ops[0].tolist(), taken.tolist())) if not a == b == c]
        assert fed.tolist() == ops[1].tolist() and want[7] == want[8] == NONFINITE
        if dd is d:  # a row all one value: its kept tokens are the lowest ids, by top_p
            assert len({want[i] for i in range(1, 4)}) == 3 and 0 <= want[2] < 0.31 * vocab + 1
        a = np.empty((DRAW_IN, n + 3), np.int64)  # the graphs' form, padded
        pack_draws(a, dd, dd.rows, dd.rows, n)
        pk = torch.from_numpy(a)
        last = torch.zeros(n + 1, dtype=torch.int64)
        z = torch.from_numpy(logits).index_select(0, pk[0])
        assert draw_packed(z, pk, None, last, kernel, dd.ordered)[0][:n].tolist() == want
        assert draw_packed(z, pk, None, last, None, dd.ordered)[0][:n].tolist() == want
dir = sys.argv[1]
eng = TorchEngine(dir, max_slots=2, max_seq_len=32, device="cpu", dtype="float32", kernels="triton", cuda_graphs=False)
assert eng._draw_kernel is launch
assert TorchEngine(dir, max_slots=2, max_seq_len=32, device="cpu", dtype="float32", kernels="torch",
                   cuda_graphs=False)._draw_kernel is None
print("kernel draws equal", n)
"""


def test_the_draw_kernel_equals_the_torch_draw_and_the_hosts(tmp_path):
    """The draw after its sort in one Triton kernel (draw_kernel.py), run by Triton's CPU interpreter:
    rows of two blocks and of less than one, sharp and flat, ties (a row all one value, +0 and -0, ties
    at the nucleus' edge), bans, a NaN and an all -inf row, every top_k and top_p: each token equals the
    torch ops' and the host's draw, op by op and in the graphs' packed form; the engine takes the
    kernel where it runs its Triton kernels."""
    pytest.importorskip("triton")
    _, path = _random_model(tmp_path, "qwen3")
    r = subprocess.run([sys.executable, "-c", _KERNEL_RUN, str(path)], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kernel draws equal" in r.stdout


def test_the_draw_kernel_compiles_for_hopper():
    """The draw kernel compiled for sm_90 by this Triton, no GPU needed (the interpreter runs the
    Python, not the compiler): its weights' exp is libdevice's float64 one, not the approximate float32
    `ex2` Triton uses for float32 (the host's numpy exp is float64)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tritonchat.python_backend.engines.torch.draw_kernel import BLOCK, load_draw_kernel

    fn = load_draw_kernel()
    for ordered in (True, False):  # the rows sorted (top_k or top_p), or not
        const = dict(SCALE=float(1 << 38), BLOCK=BLOCK, NONE=NONFINITE, ORDERED=ordered)
        sig = dict(Z="*fp32", SZ="*fp32", ORDER="*i64", TOP_K="*i64", TOP_P="*fp32", U="*fp64", TAKEN="*i64",
                   FED="*i64", V="i32", **{k: "constexpr" for k in const})
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16, num_stages=1))
        ptx = kernel.asm["ptx"]
        assert kernel.asm["cubin"] and "__nv_exp" in ptx and "ex2.approx" not in ptx, ordered


def test_a_row_with_nothing_to_draw_fails_alone():
    """Every logit -inf: the host raises (that request fails alone), the device gives NONFINITE for
    the host and a real id for a chained step; the other row is drawn as usual."""
    logits = np.zeros((2, 16), np.float32)
    logits[0] = -np.inf
    d = Draws(np.arange(2), np.ones(2, np.float32), np.zeros(2, np.int64), np.ones(2, np.float32), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="no token can be drawn"):
        draw_tokens(logits[:1].copy(), Draws(*(a[:1] for a in (d.rows, d.temperature, d.top_k, d.top_p, d.u))))
    taken, fed = draw(torch.from_numpy(logits), DrawInputs(d, d.rows, torch.device("cpu")))
    assert taken.tolist() == [NONFINITE, 8] and 0 <= int(fed[0]) < 16
    taken, fed, _ = _packed(logits, d, [0, 1], [0, 1], None)  # the graphs' form
    assert taken == [NONFINITE, 8] and 0 <= fed[0] < 16
    argmax = Draws(d.rows, np.zeros(2, np.float32), d.top_k, d.top_p, d.u)  # greedy rows alike
    taken, fed, _ = _packed(logits, argmax, [0, 1], [0, 1], None)
    assert taken == [NONFINITE, 0] and 0 <= fed[0] < 16


def test_a_step_draws_its_sampled_rows_and_the_next_step_chains_on_them(tmp_path):
    """Decode rows and the prompts a step carries, some drawn (one under a ban), the others greedy:
    each token is what the host draws from a plain engine's logits (the ban applied), and the
    chained step after it reads the drawn tokens on the device."""
    _, path = _random_model(tmp_path, "qwen3")
    kw = dict(max_slots=6, max_seq_len=64, device="cpu", dtype="float32", cuda_graphs=False)
    plain, drawn = TorchEngine(str(path), **kw), TorchEngine(str(path), **kw)
    rng = np.random.default_rng(5)
    old = [rng.integers(0, 512, n) for n in (6, 11, 4)]
    new = [rng.integers(0, 512, n) for n in (9, 3)]
    slots, pslots = np.array([2, 0, 3]), np.array([4, 1])
    for ex in (plain, drawn):
        ex.prefill_batch(slots, old)
    toks = np.array([17, 42, 5])
    logits = np.concatenate([plain.decode(slots, toks), plain.prefill_batch(pslots, new)])
    ban = Ban(rows=np.array([0, 4]), ids=np.array([int(logits[0].argmax()), 7]))
    logits[np.ix_(ban.rows, ban.ids)] = -np.inf
    d = Draws(np.array([0, 2, 4]), np.array([0.8, 1.2, 1.0], np.float32), np.array([0, 20, 0]),
              np.array([0.9, 1.0, 0.95], np.float32), np.array([0.31, 0.77, 0.05]))
    want = logits.argmax(-1)
    want[d.rows] = draw_tokens(logits[d.rows].copy(), d)
    step = drawn.decode_greedy_begin(slots, toks, ban, prompts=(pslots, new), draws=d)
    assert step.result().tolist() == want.tolist()
    assert (want[d.rows] != logits[d.rows].argmax(-1)).all()  # these u draw other tokens than the argmax
    # the next step chains on the drawn tokens (all five rows), greedy: as the plain engine fed them
    every = np.concatenate([slots, pslots])
    nxt = drawn.decode_greedy_begin(every, None, chain=step)
    assert nxt.result().tolist() == plain.decode(every, want).argmax(-1).tolist()


def test_the_transformers_fallback_draws_too(tmp_path):
    """A model without the native forward (GPT-2: the transformers fallback) draws its sampled rows
    from the logits it made, as the host would."""
    _, path = _random_model(tmp_path, "gpt2")
    kw = dict(max_slots=2, max_seq_len=32, device="cpu", dtype="float32", cuda_graphs=False)
    with pytest.warns(UserWarning, match="fallback"):
        plain, drawn = TorchEngine(str(path), **kw), TorchEngine(str(path), **kw)
    for ex in (plain, drawn):
        ex.prefill_batch([0, 1], [np.arange(5), np.arange(3, 9)])
    slots, toks = np.array([0, 1]), np.array([7, 8])
    logits = plain.decode(slots, toks)
    d = Draws(np.array([1]), np.array([0.9], np.float32), np.array([0]), np.array([0.9], np.float32), np.array([0.4]))
    want = logits.argmax(-1)
    want[1] = draw_tokens(logits[[1]].copy(), d)[0]
    assert drawn.decode_greedy_begin(slots, toks, draws=d).result().tolist() == want.tolist()
    assert want[1] != logits[1].argmax()


@pytest.mark.parametrize("capture", ["works", "fails"])
def test_the_draw_graphs_on_a_cpu_stand_in(tmp_path, monkeypatch, capture):
    """The CUDA graphs' path (graphs.StepGraphs: decode graphs, then the draw graph of the padded
    drawn rows, with and without penalties) run on the CPU with a stand-in for the capture (each
    replay runs the captured body again into the same output tensors): through the scheduler,
    sampled, penalised and greedy requests get the answers the eager engine gives them, with the draw
    graphs captured at warm-up (none while serving); where a draw graph cannot be captured, those
    steps draw eagerly, with the same answers."""
    from fake_engine import FakeTokenizer, run_jobs
    from tritonchat.python_backend.engines.torch import graphs as g

    class Replay:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            for o, new in zip(self.out, self.fn()):
                o.copy_(new)

    def record(fn, pool, device):
        if capture == "fails" and "capture_draw" in fn.__qualname__:
            raise RuntimeError("operation not permitted when stream is capturing")
        fn()
        out = fn()
        return Replay(fn, out), out

    _, path = _random_model(tmp_path, "qwen3")
    kw = dict(max_slots=3, max_seq_len=96, device="cpu", dtype="float32", cuda_graphs=False)
    eager, standin = TorchEngine(str(path), **kw), TorchEngine(str(path), **kw)
    monkeypatch.setattr(g, "record", record)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    standin.graphs = g.StepGraphs(standin.device, standin.layout, standin.graph_batch_sizes,
                                  last_ids=standin._last_ids, mix_tokens=standin.mix_tokens, buffers=True)
    standin.cuda_graphs = True
    jobs = [("Once upon a time", 30, True, {"temperature": 0.9, "top_p": 0.9, "seed": 1}),
            ("The cat", 14, False, {"repetition_penalty": 1.4, "frequency_penalty": 0.5}),
            ("A dog", 15, True),
            ("Tom", 12, False, {"temperature": 1.1, "top_k": 30, "presence_penalty": 1.0, "seed": 2}),
            ("Lily", 25, True, {"temperature": 0.7, "seed": 3})]
    tok = FakeTokenizer(512)
    if capture == "works":  # as warm-up does: every row count, both kinds, before serving
        from tritonchat.python_backend.engines.torch.sample import packed_body

        standin._counts.allocate()
        standin.graphs.capture_draws(packed_body(standin._counts, standin._last_ids), 512, torch.float32)
        warm = standin.graphs.captures["draw"]
        assert warm == 4 * len(standin.graphs.draw_sizes)  # with and without penalties, and a sort
    if capture == "fails":
        with pytest.warns(UserWarning, match="draw graph of .* not captured"):
            got = run_jobs((standin, tok), jobs)[1]
    else:
        got = run_jobs((standin, tok), jobs)[1]
    assert got == run_jobs((eager, tok), jobs)[1]
    used = set(standin.graphs.draws) if capture == "fails" else set(standin.graphs.draw_runs)
    # the kinds used: with and without penalties, sorted (top_k or top_p) and not (temperature alone)
    assert {k[1][0] for k in used} == {k[1][1] for k in used} == {False, True}
    assert standin.graphs.captures["decode"] > 0
    assert all((v is None) == (capture == "fails") for v in standin.graphs.draws.values())
    if capture == "works":
        assert standin.graphs.captures["draw"] == warm  # nothing captured while serving
    assert got[1] != run_jobs((eager, tok), [(p, n, s) for p, n, s, *_ in jobs])[1][1]  # the penalties bit


def test_a_draw_kernel_that_will_not_run_leaves_the_draw_to_the_torch_ops(monkeypatch):
    """The engine runs both forms of the draw kernel once when it starts on a GPU; one that raises (a
    Triton that cannot compile it) gives no kernel, with a warning, and the torch ops draw."""
    pytest.importorskip("triton")
    from tritonchat.python_backend.engines.torch import draw_kernel

    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(draw_kernel, "launch", broken)
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: torch.empty(0))  # no GPU here: any tensor
    monkeypatch.setattr(torch, "ones", lambda *a, device=None, **k: torch.empty(0))
    with pytest.warns(UserWarning, match="draw kernel did not compile"):
        assert draw_kernel.for_engine(True, torch.device("cuda")) is None
    assert draw_kernel.for_engine(True, torch.device("cpu")) is broken  # not tried off a GPU
    assert draw_kernel.for_engine(False, torch.device("cuda")) is None

"""The LM head's 8-bit copy (python_backend/engines/head_screen.py, build/ort_graph.py): greedy decode
steps of few rows run the copy and settle each argmax exactly. Checked here: the error bound holds for
ONNX Runtime's int8 kernel on real decode steps; the engine's greedy tokens are those of the fp32 head,
bans and slot orders included, and steps of more rows keep the fp32 head; `choose` recomputes what the
copy ranks wrongly, breaks ties as argmax does and fails a non-finite row alone."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import need_shared


@pytest.fixture(scope="module", params=[64, 80], ids=["hidden64", "hidden80-padded"])
def graph(request, tmp_path_factory):
    """The fused fp32 graph (with the copy) of a seeded tiny Llama with the Llama-2 vocabulary; 80 is not
    a multiple of the copy's blocks of 32 (zero-padded)."""
    from tritonchat.build import ort_graph
    from tritonchat.build.export import load_model, write_spec
    from tritonchat.build.synthetic import make_random_model

    need_shared("tokenizers")
    hidden = request.param
    root = tmp_path_factory.mktemp(f"screen{hidden}")
    src = make_random_model("llama", root / "hf", tokenizer="llama2", seed=5, layers=2, hidden=hidden,
                            heads=hidden // 16, kv_heads=hidden // 16, intermediate=2 * hidden, max_positions=256,
                            tie_embeddings=False)
    path = root / "onnx" / "model.onnx"
    write_spec(ort_graph.write_graph(load_model(str(src)), path), path.parent / "kv_spec.json",
               kv_layout=ort_graph.LAYOUT)
    return path


def _engine(path, slots=4):
    from tritonchat.python_backend.engines import open_ort_engine

    return open_ort_engine(path, max_slots=slots, max_seq_len=256, threads=1)


def test_the_bound_holds_for_the_int8_kernel_on_real_decode_steps(graph):
    """|screened - exact| <= bound for every token of every row over 40 steps of two sequences (exact:
    float64 from the fp32 head and the step's hidden state); and the bound is not vacuous."""
    ex = _engine(graph)
    rng = np.random.default_rng(0)
    for slot in (0, 1):
        ex.prefill(slot, rng.integers(3, ex.vocab_size, 9))
    tokens, worst = np.array([5, 7]), 0.0
    for _ in range(40):
        rows = ex._step(np.array([0, 1]), tokens, screen=True)
        hidden, screened = ex._hidden[rows, 0], ex._screened[rows, 0]
        exact = hidden.astype(np.float64) @ ex.screen.head_t.T.astype(np.float64)
        err = np.abs(screened - exact).max(1)
        bound = ex.screen.bound(hidden)
        assert (err <= bound).all(), (err, bound)
        worst = max(worst, float((err / bound).max()))
        tokens = exact.argmax(1)
    assert 0.05 < worst <= 1.0, worst  # the activations' and weights' rounding do come near it


def test_greedy_tokens_are_the_fp32_heads(graph):
    """Sequences join, leave and decode in 1 to 4 rows (screened) or 5 to 6 (the fp32 head), slots in
    any order, with end ids banned in some rows: every token equals the argmax of the fp32 head's logits
    (a twin engine's `decode`), and the screened steps did run."""
    from tritonchat.python_backend.engines.base import Ban, greedy_tokens

    from tritonchat.python_backend.engines.ort_gqa import SCREEN_MAX_ROWS

    ex, twin = _engine(graph, slots=6), _engine(graph, slots=6)
    rng = np.random.default_rng(1)
    last: dict[int, int] = {}
    screened_steps = full_steps = 0
    for step in range(80):
        free = [s for s in range(ex.max_slots) if s not in last]
        if free and (len(last) < 1 or rng.random() < 0.35):
            slot = int(rng.choice(free))
            prompt = rng.integers(3, ex.vocab_size, int(rng.integers(2, 12)))
            first = greedy_tokens(ex.prefill(slot, prompt)[None])[0]
            assert first == greedy_tokens(twin.prefill(slot, prompt)[None])[0]
            last[slot] = int(first)
        if len(last) > 1 and rng.random() < 0.15 or any(ex.length(s) > 200 for s in last):
            gone = int(rng.choice(list(last)))
            del last[gone]
            ex.release(gone)
            twin.release(gone)
        chosen = rng.permutation(list(last))[: int(rng.integers(1, 7))]
        if not len(chosen):
            continue
        tokens = np.array([last[int(s)] for s in chosen])
        ban = Ban(np.array([0]), np.array(sorted(set(rng.integers(3, ex.vocab_size, 3).tolist())))) \
            if rng.random() < 0.5 else None
        before = ex.screen.rows
        got = ex.decode_greedy(chosen, tokens, ban)
        want = greedy_tokens(twin.decode(chosen, tokens), ban)
        np.testing.assert_array_equal(got, want)
        if ban is not None:
            assert got[0] not in ban.ids
        if ex.screen.rows > before:
            screened_steps += 1
        else:
            full_steps += 1
            assert len(chosen) > SCREEN_MAX_ROWS  # only steps of more rows skip the copy
        for s, t in zip(chosen, got):
            last[int(s)] = int(t)
    assert screened_steps > 20 and full_steps > 5, (screened_steps, full_steps)
    assert ex.screen.candidates < 200 * ex.screen.rows  # a handful of recomputed logits per row, not the vocabulary


def _screen(head_t: np.ndarray):
    from tritonchat.build.ort_graph import _head_copy
    from tritonchat.python_backend.engines.head_screen import HeadScreen

    q8, scales, _ = _head_copy(head_t)
    deq = ((q8.astype(np.float32) - 128) * scales[..., None]).reshape(len(head_t), -1)[:, :head_t.shape[1]]
    return HeadScreen(head_t, q8, scales), deq


def test_choose_recomputes_what_the_copy_ranks_wrongly():
    """Two tokens whose fp32 logits differ by less than the copy's rounding: the copy ranks them the
    other way round, `choose` gives the fp32 argmax; an exact tie goes to the lower id; a row with a
    NaN hidden state gets NONFINITE while the other row is answered."""
    from tritonchat.python_backend.engines.base import NONFINITE

    rng = np.random.default_rng(2)
    head = (rng.standard_normal((500, 64)) * 0.02).astype(np.float32)
    h = rng.standard_normal(64).astype(np.float32)
    found = None
    for _ in range(2000):  # a pair of rows that the copy ranks wrongly: nudge row 7 towards row 3 until it does
        head[7] = head[3] + (rng.standard_normal(64) * 2e-4).astype(np.float32)
        screen, deq = _screen(head)
        exact = head.astype(np.float64) @ h.astype(np.float64)
        approx = (deq @ h).astype(np.float32)
        if exact.argmax() in (3, 7) and approx.argmax() in (3, 7) and approx.argmax() != exact.argmax():
            found = exact
            break
        head[3] += (rng.standard_normal(64) * 0.05).astype(np.float32)  # another pair when this one agrees
    assert found is not None
    got = screen.choose(h[None], approx[None].copy())
    assert got[0] == found.argmax() != approx.argmax()

    tied = head.copy()
    tied[9] = tied[4] = tied[exact.argmax()] * 1.5  # rows 4 and 9: the same, best logit
    screen, deq = _screen(tied)
    assert screen.choose(h[None], (deq @ h)[None].astype(np.float32))[0] == 4

    bad = np.stack([h, h])
    bad[0, 5] = np.nan
    out = screen.choose(bad, (bad @ deq.T).astype(np.float32))
    assert out[0] == NONFINITE and out[1] == 4


def test_the_build_writes_the_copy_where_the_head_is_fp32(tmp_path):
    """fp32 builds carry the copy (manifest `head_screen`), `head_screen: false` and int8-weight-only
    builds do not; the generator's engine runs it where the graph has it."""
    import json

    import onnx
    from rich.console import Console

    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings
    from tritonchat.build.synthetic import make_random_model

    need_shared("tokenizers")
    src = make_random_model("llama", tmp_path / "hf", tokenizer="llama2", seed=1, layers=1, hidden=32, heads=2,
                            intermediate=64, max_positions=256)
    con = Console(record=True, width=200)
    for name, kw, want in (("fp32", {}, True), ("off", {"head_screen": False}, False),
                           ("int8", {"precision": "int8-weight-only", "accuracy_gate": False}, False)):
        repo = tmp_path / name
        gate = kw.pop("accuracy_gate", True)
        run_build(str(src), repo, load_settings(None, max_seq_len=256, **kw), progress_console=con, accuracy_gate=gate)
        assert json.loads((repo / "manifest.json").read_text())["head_screen"] is want
        model = repo / "generator" / "1" / "model.onnx"
        inputs = {i.name for i in onnx.load(str(model), load_external_data=False).graph.input}
        assert ("screen_rows" in inputs) is want
        assert (_engine(model).screen is not None) is want


def test_the_engine_reads_the_copy_from_hard_linked_files(graph, tmp_path):
    """`tritonchat deploy` stages a version's files as hard links; onnx's loader refuses such a data
    file, the engine reads the head from it all the same (the same arrays as from the original)."""
    import os

    linked = tmp_path / "v2"
    linked.mkdir()
    for f in graph.parent.iterdir():
        os.link(f, linked / f.name)
    a, b = _engine(graph).screen, _engine(linked / graph.name).screen
    np.testing.assert_array_equal(a.head_t, b.head_t)
    assert a.weight_error == b.weight_error > 0

"""Long prompts prefilled a piece at a time between decode steps (the scheduler's `prefill_chunk`): on
the deterministic fake engine (every answer its reference, the pieces' offsets, decode steps between
them, cancellation between two pieces), and on the ONNX Runtime engine's fused graph, where the
greedy answers with pieces equal those of whole prefills token for token."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fake_engine import FakeEngine, FakeTokenizer


def _submit(sched, prompt, max_tokens):
    """Submit token ids; returns (outputs, done event, the sequence)."""
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.sequence import Sequence

    outs, done = [], threading.Event()

    def sink(out):
        outs.append(out)
        if out.final:
            done.set()

    seq = Sequence(np.asarray(prompt, dtype=np.int64), SamplingParams(max_tokens=max_tokens, end_ids=()),
                   TextTracker(FakeTokenizer(sched.engine.vocab_size)), sink)
    sched.submit(seq)
    return outs, done, seq


def _tokens(outs):
    final = outs[-1]
    assert final.error is None, final.error
    return final.release.window[final.release.read_offset:] if final.release else []


def test_a_long_prompt_goes_in_pieces_between_decode_steps():
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex = FakeEngine(max_slots=3, max_seq_len=512, vocab_size=64, can_reuse=True, step_s=0.001)
    sched = Scheduler(ex, prefill_chunk=16, prefix_reuse=False)
    rng = np.random.default_rng(0)
    short = [int(t) for t in rng.integers(3, 64, 5)]
    long = [int(t) for t in rng.integers(3, 64, 101)]
    try:
        a = _submit(sched, short, 60)
        time.sleep(0.01)  # the short one is decoding
        b = _submit(sched, long, 8)
        for outs, done, _ in (a, b):
            assert done.wait(30)
        assert _tokens(a[0]) == ex.reference(short, 60)[0][:len(_tokens(a[0]))] and len(_tokens(a[0])) == 60
        assert _tokens(b[0]) == ex.reference(long, 8)[0]
    finally:
        sched.shutdown()
    # 101 tokens in pieces of 16 on top of what the pieces before left: offsets 0, 16, ..., 96 (the
    # last piece the 5 tokens left)
    assert [c for _, c in ex.reused][-7:] == [0, 16, 32, 48, 64, 80, 96]
    assert sched.stats.prefill_chunks == 7
    # decode steps of the short request ran between the pieces: it did not wait for the whole prompt
    kinds = [c[0] for c in ex.calls]
    first = kinds.index("prefill", 1)
    last = len(kinds) - 1 - kinds[::-1].index("prefill")
    assert kinds[first:last].count("greedy") >= 5  # a greedy decode step after every piece


def test_a_request_cancelled_between_two_pieces_ends_and_frees_its_slot():
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex = FakeEngine(max_slots=1, max_seq_len=512, vocab_size=64, can_reuse=True, step_s=0.01)
    sched = Scheduler(ex, prefill_chunk=8, prefix_reuse=False)
    try:
        outs, done, seq = _submit(sched, list(range(3, 123)), 8)
        time.sleep(0.035)  # a few pieces in (of 15)
        seq.cancelled = True  # as the generator does for the entry's cancel request
        sched.wake()
        assert done.wait(10)
        assert outs[-1].finish_reason == "cancelled" and 0 < sched.stats.prefill_chunks < 15
        after, done2, _ = _submit(sched, [5, 6, 7], 4)  # the one slot is free again
        assert done2.wait(10) and _tokens(after) == ex.reference([5, 6, 7], 4)[0]
    finally:
        sched.shutdown()


@pytest.fixture(scope="module")
def fused_graph(tmp_path_factory):
    """A seeded tiny Llama's fused CPU graph (build/ort_graph.py)."""
    from conftest import need_shared
    from tritonchat.build import ort_graph
    from tritonchat.build.export import load_model, write_spec
    from tritonchat.build.synthetic import make_random_model

    need_shared("tokenizers")
    tmp = tmp_path_factory.mktemp("chunk")
    src = make_random_model("llama", tmp / "hf", tokenizer="llama2", seed=5, layers=2, hidden=64, heads=4,
                            kv_heads=2, intermediate=160, max_positions=512)
    out = tmp / "model.onnx"
    write_spec(ort_graph.write_graph(load_model(str(src)), out), tmp / "kv_spec.json", kv_layout=ort_graph.LAYOUT)
    return out


@pytest.mark.parametrize("chunk", [16, 15])
def test_pieces_are_bitwise_a_whole_prefill_on_the_fused_graph(fused_graph, chunk):
    """The engine calls `_chunk` makes (each piece on top of the pieces before): the last logits and
    the KV of every position equal a whole prefill's, bit for bit, for prompts of 40 to 200 tokens."""
    from tritonchat.python_backend.engines import open_ort_engine

    ex = open_ort_engine(fused_graph, max_slots=2, max_seq_len=512, threads=1)
    rng = np.random.default_rng(2)
    for n in (40, 77, 97, 123, 193, 200):
        ids = rng.integers(3, ex.vocab_size, n)
        whole = ex.prefill(0, ids).copy()
        start = 0
        while start < n:
            end = n if n - (start + chunk) < ex.reuse_min_new else start + chunk
            got = ex.prefill_cached([1], [ids[:end]], [start])[0]
            start = end
        assert np.array_equal(got, whole), n
        for store in ex.cache:
            assert np.array_equal(store[ex.row[1], :, :n], store[ex.row[0], :, :n]), n
        ex.release(0)
        ex.release(1)


@pytest.mark.parametrize("chunk", [16, 15])
def test_pieces_give_the_answers_of_whole_prefills_through_the_scheduler(fused_graph, chunk):
    """Prompts of 40-200 tokens, 3 slots for 6 requests at once: greedy answers with prefill_chunk (even
    and odd pieces) equal those of whole prefills, token for token."""
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.engines import open_ort_engine

    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, 32000, int(n))] for n in (40, 77, 123, 200, 64, 151)]

    def answers(prefill_chunk):
        sched = Scheduler(open_ort_engine(fused_graph, max_slots=3, max_seq_len=512, threads=1),
                          prefill_chunk=prefill_chunk, prefix_reuse=False)
        try:
            pending = [_submit(sched, p, 12) for p in prompts]
            for _, done, _ in pending:
                assert done.wait(60)
            return [_tokens(o) for o, _, _ in pending], sched.stats.prefill_chunks
        finally:
            sched.shutdown()

    whole, none = answers(0)
    pieces, chunks = answers(chunk)
    assert none == 0 and chunks >= 20
    assert pieces == whole


def test_a_piece_that_fails_fails_its_request_alone_and_the_next_is_served():
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex = FakeEngine(max_slots=2, max_seq_len=512, vocab_size=64, can_reuse=True)
    real = ex.prefill_cached

    def breaks_on_a_later_piece(slots, prompts, cached):
        if cached[0] >= 16:
            raise RuntimeError("engine fault")
        return real(slots, prompts, cached)

    ex.prefill_cached = breaks_on_a_later_piece
    sched = Scheduler(ex, prefill_chunk=16, prefix_reuse=False)
    try:
        outs, done, _ = _submit(sched, list(range(3, 63)), 8)
        assert done.wait(10)
        assert outs[-1].error == "prefill failed: the engine raised RuntimeError on this prompt (details in the server log)"
        ex.prefill_cached = real
        after, done2, _ = _submit(sched, [5, 6, 7], 4)
        assert done2.wait(10) and _tokens(after) == ex.reference([5, 6, 7], 4)[0]
    finally:
        sched.shutdown()

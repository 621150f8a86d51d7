"""The continuous-batching scheduler and its courier, without Triton (ONNX Runtime executor)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from e2e_helpers import STORIES, need


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tokenizers import Tokenizer

    from tritonchat.build.export import export_onnx, load_model, write_spec
    from tritonchat.python_backend.engine_ort import OrtExecutor

    need(STORIES)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    spec = export_onnx(load_model(str(STORIES)), out)
    write_spec(spec, out.parent / "kv_spec.json")
    return OrtExecutor(out, max_slots=4, max_seq_len=256), Tokenizer.from_file(str(STORIES / "tokenizer.json"))


def _run(engine, jobs, sink_delay=0.0, cancel_after=None, stream_interval=0.0, stats=None, **params):
    from tritonchat.python_backend.detokenize import TextTracker, delta
    from tritonchat.python_backend.sampling import SamplingParams
    from tritonchat.python_backend.scheduler import Scheduler, Sequence

    ex, tok = engine
    sched = Scheduler(ex, stream_interval=stream_interval)
    results, done = {}, threading.Event()

    def make(i, prompt, n, stream):
        outs = []
        flag = {"cancel": False}

        def sink(out):
            time.sleep(sink_delay)
            outs.append(out)
            if cancel_after is not None and len(outs) >= cancel_after:
                flag["cancel"] = True
            if out.final:
                results[i] = outs
                if len(results) == len(jobs):
                    done.set()

        ids = np.array(tok.encode(prompt).ids)
        return Sequence(ids, SamplingParams(max_tokens=n, **{"end_ids": (2,), **params}), TextTracker(tok), sink, stream=stream,
                        is_cancelled=lambda: flag["cancel"])

    for i, job in enumerate(jobs):
        sched.submit(make(i, *job))
    assert done.wait(60)
    sched.shutdown()
    if stats is not None:
        stats.append(sched.stats)
    texts = {i: "".join(delta(tok, o.release.window, o.release.read_offset, o.release.trim_chars)
                        for o in outs if o.release) for i, outs in results.items()}
    return results, texts


def test_more_requests_than_slots_all_finish_with_solo_answers(engine):
    jobs = [("Once upon a time", 30, False), ("The cat", 20, True), ("A dog", 25, True), ("Tom", 15, False),
            ("Lily", 30, True), ("The sun", 10, True)]
    _, together = _run(engine, jobs)
    solo = {i: _run(engine, [job])[1][0] for i, job in enumerate(jobs)}
    assert together == solo


def test_a_slow_client_gets_merged_deltas_with_the_same_text(engine):
    fast, fast_text = _run(engine, [("Once upon a time", 60, True)])
    slow, slow_text = _run(engine, [("Once upon a time", 60, True)], sink_delay=0.01)
    assert slow_text == fast_text
    assert len(slow[0]) < len(fast[0])  # the courier merged the backlog into fewer responses
    assert slow[0][-1].final and slow[0][-1].finish_reason == "length"


def test_cancellation_frees_the_slot(engine):
    results, _ = _run(engine, [("Once upon a time", 200, True)] * 4 + [("The cat", 10, False)], cancel_after=3)
    reasons = sorted(outs[-1].finish_reason for outs in results.values())
    assert reasons.count("cancelled") == 4 and results[4][-1].finish_reason == "length"


def test_stream_interval_sends_fewer_larger_deltas(engine):
    """With an interval, the first token still goes at once, later ones go together; same text."""
    every, every_text = _run(engine, [("Once upon a time", 80, True)])
    held, held_text = _run(engine, [("Once upon a time", 80, True)], stream_interval=0.5)
    assert held_text == every_text
    assert held[0][0].num_output_tokens == 1  # the first token is never held
    assert len(held[0]) < len(every[0]) / 4
    assert held[0][-1].final and held[0][-1].num_output_tokens == 80


def test_min_tokens_on_the_argmax_path_equals_the_host_sampler(engine):
    """Greedy + min_tokens takes the executor's argmax with a ban of the end ids; the host sampler
    (forced by a bad word that never matches) must choose the same tokens."""
    job = [("Once upon a time", 60, False)]
    natural, _ = _run(engine, job)
    ids = natural[0][-1].release.window
    end = next(t for i, t in enumerate(ids) if i >= 5 and t not in ids[:i])  # stories260K never says EOS:
    stopped, stopped_texts = _run(engine, job, end_ids=(end,))  # a token it does say plays the end id
    assert stopped[0][-1].finish_reason == "stop" and stopped[0][-1].num_output_tokens < 60
    fast, fast_texts = _run(engine, job, end_ids=(end,), min_tokens=60)
    slow, slow_texts = _run(engine, job, end_ids=(end,), min_tokens=60, bad_words_ids=((0, 0, 0, 0),))
    fast_text, slow_text, stopped_text = fast_texts[0], slow_texts[0], stopped_texts[0]
    assert fast_text == slow_text and fast_text.startswith(stopped_text) and len(fast_text) > len(stopped_text)
    assert fast[0][-1].finish_reason == "length" and fast[0][-1].num_output_tokens == 60


def test_chained_steps_give_the_same_answers(engine):
    """The torch executor chains greedy steps (the next one fed by the previous one's tokens on the
    device, launched before the host reads them). Requests of different lengths, a pile-up beyond
    the slots, and a token playing an end id (so one sequence ends inside a chain): same answers
    with and without chaining, and as each alone."""
    from tritonchat.python_backend.engine_torch import TorchExecutor

    _, tok = engine
    ex = TorchExecutor(str(STORIES), max_slots=4, max_seq_len=256, device="cpu", dtype="float32", cuda_graphs=False)
    assert ex.can_chain
    natural, _ = _run((ex, tok), [("Once upon a time", 40, False)])
    ids = natural[0][-1].release.window
    end = next(t for i, t in enumerate(ids) if i >= 12 and t not in ids[:i])
    jobs = [("Once upon a time", 40, True), ("The cat", 25, False), ("A dog", 33, True), ("Tom", 15, False),
            ("Lily", 30, True), ("The sun", 50, True)]
    stats = []
    chained, chained_texts = _run((ex, tok), jobs, end_ids=(end,), stats=stats)
    assert stats[0].chained > 0.5 * stats[0].steps
    assert any(outs[-1].finish_reason == "stop" for outs in chained.values())
    ex.can_chain = False
    plain, plain_texts = _run((ex, tok), jobs, end_ids=(end,))
    solo = {i: _run((ex, tok), [job], end_ids=(end,))[1][0] for i, job in enumerate(jobs)}
    assert chained_texts == plain_texts == solo
    assert [o[-1].num_output_tokens for o in chained.values()] == [o[-1].num_output_tokens for o in plain.values()]

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


def _run(engine, jobs, sink_delay=0.0, cancel_after=None):
    from tritonchat.python_backend.detokenize import TextTracker, delta
    from tritonchat.python_backend.sampling import SamplingParams
    from tritonchat.python_backend.scheduler import Scheduler, Sequence

    ex, tok = engine
    sched = Scheduler(ex)
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
        return Sequence(ids, SamplingParams(max_tokens=n, end_ids=(2,)), TextTracker(tok), sink, stream=stream,
                        is_cancelled=lambda: flag["cancel"])

    for i, job in enumerate(jobs):
        sched.submit(make(i, *job))
    assert done.wait(60)
    sched.shutdown()
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

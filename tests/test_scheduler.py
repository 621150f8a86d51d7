"""The continuous-batching scheduler on real engines, without Triton: answers equal to a real model's
(ONNX Runtime on an exported stories260K; the torch engine on CPU for chained steps and prompts inside
decode steps). The scheduler's and the courier's logic alone, on the deterministic fake engine:
tests/test_scheduler_logic.py and tests/test_courier.py."""

from __future__ import annotations

import pytest

from e2e_helpers import STORIES, need
from fake_engine import run_jobs as _run


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tokenizers import Tokenizer

    from tritonchat.build.export import export_onnx, load_model, write_spec
    from tritonchat.python_backend.engines.ort import OrtEngine

    need(STORIES)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    spec = export_onnx(load_model(str(STORIES)), out)
    write_spec(spec, out.parent / "kv_spec.json")
    return OrtEngine(out, max_slots=4, max_seq_len=256), Tokenizer.from_file(str(STORIES / "tokenizer.json"))


def test_more_requests_than_slots_all_finish_with_solo_answers(engine):
    jobs = [("Once upon a time", 30, False), ("The cat", 20, True), ("A dog", 25, True), ("Tom", 15, False),
            ("Lily", 30, True), ("The sun", 10, True)]
    _, together = _run(engine, jobs)
    solo = {i: _run(engine, [job])[1][0] for i, job in enumerate(jobs)}
    assert together == solo


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
    from tritonchat.python_backend.engines.torch import TorchEngine

    _, tok = engine
    ex = TorchEngine(str(STORIES), max_slots=4, max_seq_len=256, device="cpu", dtype="float32", cuda_graphs=False)
    assert ex.can_chain
    natural, _ = _run((ex, tok), [("Once upon a time", 40, False)])
    ids = natural[0][-1].release.window
    end = next(t for i, t in enumerate(ids) if i >= 12 and t not in ids[:i])
    jobs = [("Once upon a time", 40, True), ("The cat", 25, False), ("A dog", 33, True), ("Tom", 15, False),
            ("Lily", 30, True), ("The sun", 50, True)]
    stats = []
    chained, chained_texts = _run((ex, tok), jobs, end_ids=(end,), stats=stats)
    assert stats[0].chained > 0.5 * stats[0].steps
    summary = stats[0].summary()  # what the generator logs at shutdown
    assert summary["prefill_calls"] >= 1 and summary["prompts_per_prefill"] >= 1
    assert stats[0].decode_wait_s > 0 and stats[0].bookkeeping_s > 0 and stats[0].prefill_s > 0
    assert 0 < stats[0].prefill_exec_s <= stats[0].prefill_s and stats[0].launch_s > 0
    # 6 requests in 4 slots: the last two waited for slots that the first ones freed
    assert stats[0].slot_gaps >= 2 and summary["slot_gap_ms_mean"] > 0
    assert summary["queue_ms_mean"] > 0 and stats[0].queue_s >= stats[0].slot_gap_s
    # every response the courier sent is counted, with how long it waited to go out
    sent = sum(len(outs) for outs in chained.values())
    assert stats[0].sends == sent and summary["send_lag_ms_mean"] > 0
    assert stats[0].send_lag_max_s >= stats[0].send_lag_s / sent
    # the courier asked about cancellation for the running sequences (first round at once)
    assert stats[0].polls >= 1 and summary["poll_ms_mean"] >= 0
    assert any(outs[-1].finish_reason == "stop" for outs in chained.values())
    # the two requests that found no slot were prefilled inside decode steps, and the chain went on
    # across every end but the last
    assert stats[0].mixed_steps >= 1 and stats[0].prefill_calls + stats[0].mixed_steps >= 2
    assert stats[0].chained >= stats[0].steps - 3
    unmixed, unmixed_texts = _run((ex, tok), jobs, end_ids=(end,), mix_prefill=False)
    ex.can_chain = False
    plain, plain_texts = _run((ex, tok), jobs, end_ids=(end,))
    solo = {i: _run((ex, tok), [job], end_ids=(end,))[1][0] for i, job in enumerate(jobs)}
    assert chained_texts == plain_texts == solo == unmixed_texts
    assert [o[-1].num_output_tokens for o in chained.values()] == [o[-1].num_output_tokens for o in plain.values()]


def test_prompts_in_decode_steps_with_min_tokens_and_cancellation():
    """Requests arriving while others decode ride in decode steps (`mix_prefill`): with `min_tokens`
    banning an end id the model does say (the ban reaches a new prompt's first-token row and the
    chained rows after it), the answers equal one-at-a-time runs; streams cancelled inside a chain
    end, and their slots serve the request behind them."""
    from tokenizers import Tokenizer

    from tritonchat.python_backend.engines.torch import TorchEngine

    need(STORIES)
    tok = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
    ex = TorchEngine(str(STORIES), max_slots=3, max_seq_len=256, device="cpu", dtype="float32", cuda_graphs=False)
    natural, _ = _run((ex, tok), [("The cat", 30, False)])
    ids = natural[0][-1].release.window
    end = next(t for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])
    jobs = [("The cat", 30, False), ("Once upon a time", 24, True), ("A dog", 18, True), ("Tom", 22, False),
            ("Lily", 26, True)]
    stats = []
    mixed, texts = _run((ex, tok), jobs, end_ids=(end,), min_tokens=12, stats=stats)
    assert stats[0].mixed_steps >= 1
    solo = {i: _run((ex, tok), [job], end_ids=(end,), min_tokens=12)[1][0] for i, job in enumerate(jobs)}
    assert texts == solo
    assert all(outs[-1].num_output_tokens >= 12 for outs in mixed.values())
    stats = []
    results, _ = _run((ex, tok), [("Once upon a time", 200, True)] * 4 + [("The cat", 10, False)],
                      cancel_after=3, stats=stats)
    reasons = sorted(outs[-1].finish_reason for outs in results.values())
    assert reasons.count("cancelled") == 4 and results[4][-1].finish_reason == "length"
    assert stats[0].chained > 0 and stats[0].cancelled == 4

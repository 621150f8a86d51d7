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
    from tritonchat.python_backend.engines.ort import OrtEngine

    need(STORIES)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    spec = export_onnx(load_model(str(STORIES)), out)
    write_spec(spec, out.parent / "kv_spec.json")
    return OrtEngine(out, max_slots=4, max_seq_len=256), Tokenizer.from_file(str(STORIES / "tokenizer.json"))


def _run(engine, jobs, sink_delay=0.0, cancel_after=None, stream_interval=0.0, stats=None, mix_prefill=True,
         **params):
    from tritonchat.python_backend.batching.detokenize import TextTracker, delta
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler, Sequence

    ex, tok = engine
    sched = Scheduler(ex, stream_interval=stream_interval, mix_prefill=mix_prefill)
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


class _Recording:
    """Wraps an executor: records each prefill_batch's group size; each decode step takes >= `step` s."""

    def __init__(self, ex, step=0.003):
        self.ex, self.step, self.groups = ex, step, []

    def __getattr__(self, name):
        return getattr(self.ex, name)

    def prefill_batch(self, slots, prompts):
        self.groups.append(len(prompts))
        return self.ex.prefill_batch(slots, prompts)

    def decode_greedy_begin(self, *a, **k):
        time.sleep(self.step)
        return self.ex.decode_greedy_begin(*a, **k)


def _staggered(engine, prefill_wait, gaps, max_slots=None):
    """Submit one long request, then one more after each gap (seconds); return (prefill group sizes,
    seconds from each later request's arrival to its first token)."""
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler, Sequence

    ex, tok = engine
    rec = _Recording(ex)
    if max_slots:
        rec.max_slots = max_slots
    sched = Scheduler(rec, prefill_wait=prefill_wait)
    finished, firsts = threading.Semaphore(0), {}

    def make(i, n):
        def sink(out):
            firsts.setdefault(i, time.perf_counter())
            if out.final:
                finished.release()
        return Sequence(np.array(tok.encode("Once upon a time").ids), SamplingParams(max_tokens=n, end_ids=(2,)),
                        TextTracker(tok), sink, stream=True)

    seqs = [make(0, 60)] + [make(i + 1, 5) for i in range(len(gaps))]
    sched.submit(seqs[0])
    for seq, gap in zip(seqs[1:], gaps):
        time.sleep(gap)
        sched.submit(seq)
    for _ in seqs:
        assert finished.acquire(timeout=60)
    sched.shutdown()
    return rec.groups, [firsts[i] - seqs[i].arrived for i in range(1, len(seqs))]


def test_prefill_wait_lets_arrivals_share_one_prefill(engine):
    """While a sequence decodes (60 steps of >= 3 ms), two requests 50 ms apart: at once, two
    prefills; with a 200 ms wait, one prefill of both, and the first waited for the second but no
    longer than the wait. The first request of an idle engine never waits."""
    groups, _ = _staggered(engine, 0.0, [0.05, 0.05])
    assert groups == [1, 1, 1]
    groups, ttft = _staggered(engine, 0.2, [0.05, 0.05])
    assert groups == [1, 2]
    assert 0.05 < ttft[0] < 0.2 + 0.5  # waited for the second request, within the wait (+ slack)
    groups, ttft = _staggered(engine, 0.1, [0.05])  # nobody else comes: admitted when the wait ends
    assert groups == [1, 1] and 0.1 <= ttft[0] < 0.1 + 0.5


def test_prefill_wait_ends_when_the_waiting_fill_the_free_slots(engine):
    groups, ttft = _staggered(engine, 5.0, [0.02], max_slots=2)  # 1 running + 1 waiting = every slot
    assert groups == [1, 1] and ttft[0] < 1.0


def test_courier_sends_first_tokens_and_finals_before_queued_deltas():
    """While the courier is busy, queued deltas of one stream merge into one response, and a first
    token or a final response waiting behind them goes out first; each stream's text stays in order."""
    from tritonchat.python_backend.batching.detokenize import Release
    from tritonchat.python_backend.batching.scheduler import Courier, Output, Sequence

    sent, gate = [], threading.Event()

    def seq(name):
        def sink(out):
            if not sent:
                gate.wait(10)  # the first send blocks: everything after it queues up
            sent.append((name, out))
        return Sequence(np.zeros(1, np.int64), None, None, sink=sink)

    def delta(start, ids, **kw):
        return Output(Release(list(ids), 0, 0, start), 1, start + len(ids), **kw)

    courier = Courier()
    a, b, c, d = seq("a"), seq("b"), seq("c"), seq("d")
    courier.post(d, delta(0, [1]))  # in flight, held at the gate
    time.sleep(0.1)
    courier.post(a, delta(0, [1, 2]))
    courier.post(a, delta(2, [3]))  # merges with a's first delta
    courier.post(b, delta(0, [4]))
    courier.post(c, delta(0, [5], urgent=True))  # a first token
    courier.post(b, delta(1, [6], final=True, finish_reason="length"))  # a final, carries b's queued delta
    gate.set()
    courier.shutdown()
    assert [n for n, _ in sent] == ["d", "c", "b", "a"]
    outs = dict(sent)
    assert outs["a"].release.window == [1, 2, 3] and not outs["a"].final
    assert outs["b"].release.window == [4, 6] and outs["b"].final and outs["b"].finish_reason == "length"
    assert courier.stats.sends == 4 and courier.stats.send_lag_max_s >= 0.1 and courier.stats.send_s >= 0.1


def test_a_request_is_never_polled_after_its_final_response(engine, monkeypatch):
    """The courier watches a request (polls whether it was cancelled) until its final response goes.
    Asking tritonserver about a request after that crashed the server (its response factory is freed
    with the final response), so the courier must watch a request before the loop can finish it: here
    `watch` is slowed down, and each one-token request is finished at once by its prefill."""
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Courier, Scheduler, Sequence

    slow_watch = Courier.watch

    def watch(self, seq):
        time.sleep(0.2)  # the loop, were it able to see the request, would finish it meanwhile
        slow_watch(self, seq)

    monkeypatch.setattr(Courier, "watch", watch)
    ex, tok = engine
    sched = Scheduler(ex)
    finals, after = [], []
    seqs = []
    for prompt in ("Once upon a time", "The cat"):
        polled = {"final": False}

        def is_cancelled(p=polled):
            if p["final"]:
                after.append(p)  # asked after its final response
            return False

        def sink(out, p=polled):
            if out.final:
                p["final"] = True
                finals.append(out)

        seq = Sequence(np.array(tok.encode(prompt).ids), SamplingParams(max_tokens=1, end_ids=(2,)), TextTracker(tok),
                       sink, stream=True, is_cancelled=is_cancelled)
        seqs.append(seq)
        sched.submit(seq)
    deadline = time.time() + 10
    while len(finals) < 2 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(3 * sched.courier.poll_interval)  # a few polling rounds after the finals
    sched.shutdown()
    assert len(finals) == 2 and all(f.finish_reason == "length" for f in finals)
    assert not after and not (set(seqs) & sched.courier.watched)


def test_a_request_banning_other_end_ids_is_not_starved():
    """A running stream under `min_tokens` bans its end id inside the step; a request that bans
    another end id cannot share that step's ban, so it gets a prefill of its own at once instead of
    waiting for the first stream to pass its `min_tokens` (or end)."""
    from tokenizers import Tokenizer

    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.engines.torch import TorchEngine
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler, Sequence

    need(STORIES)
    tok = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
    ex = TorchEngine(str(STORIES), max_slots=3, max_seq_len=256, device="cpu", dtype="float32", cuda_graphs=False)
    sched = Scheduler(ex)
    first_seen, long_count, done = threading.Event(), [0], threading.Semaphore(0)
    at_first = []

    def long_sink(out):
        long_count[0] = out.num_output_tokens
        if long_count[0] >= 3:
            first_seen.set()
        if out.final:
            done.release()

    def short_sink(out):
        if not at_first:
            at_first.append(long_count[0])
        if out.final:
            done.release()

    ids = np.array(tok.encode("Once upon a time").ids)
    sched.submit(Sequence(ids, SamplingParams(max_tokens=120, min_tokens=110, end_ids=(5,)), TextTracker(tok),
                          long_sink, stream=True))
    assert first_seen.wait(30)
    sched.submit(Sequence(ids, SamplingParams(max_tokens=5, min_tokens=3, end_ids=(7,)), TextTracker(tok),
                          short_sink, stream=True))
    for _ in range(2):
        assert done.acquire(timeout=60)
    sched.shutdown()
    assert at_first[0] < 40, f"the second request's first token came after {at_first[0]} tokens of the first"
    assert sched.stats.prefill_calls == 2

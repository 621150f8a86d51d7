"""The scheduler's and the courier's logic on the deterministic fake engine (tests/fake_engine.py):
fast, no model files, no torch; the chained and mixed paths run on CPU through the fake's
`can_chain` / `can_mix`. (tests/test_scheduler.py checks answers against real engines.)"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fake_engine import FakeEngine, FakeTokenizer, fake, run_jobs

_run = run_jobs
VARIANTS = {"plain": {}, "chain": {"can_chain": True}, "mix": {"can_mix": True},
            "chain+mix": {"can_chain": True, "can_mix": True},
            # prefix reuse (tests/test_prefix_reuse.py): slots taken by prefix, else least recently freed
            "reuse": {"can_reuse": True}}


@pytest.fixture
def engine():
    """A plain engine (no chaining, no prompts in decode steps) whose steps take 2 ms, as a small
    model's do on CPU: long enough for a client's cancellation or a late request to land mid-answer."""
    return fake(step_s=0.002)


def _words(tokens, reason="length") -> str:
    """The text of an answer (an end id that stopped it is not part of it)."""
    return FakeTokenizer().decode(tokens[:-1] if reason == "stop" else tokens)


# -- answers: every path gives each request its answer alone ---------------------------------------

PROMPTS = ["Once upon a time", "The cat", "A dog", "Tom", "Lily", "The sun", "Ben and Mia", "A big red ball",
           "Sue", "The little bird", "Max", "One day"]


@pytest.mark.parametrize("vocab", [64, 8])
@pytest.mark.parametrize("variant", VARIANTS)
def test_answers_equal_the_reference_on_every_path(variant, vocab):
    """More requests than slots, ids the model does say playing the end ids (so some end inside a
    chain; with 8 ids, often), and `min_tokens` banning them for half of the requests (the ban
    reaches a new prompt's first-token row: one such request's first token is an end id, and the
    chained rows after it): every answer is the request's answer alone, and the variant's path ran
    (chained steps, prompts inside decode steps)."""
    ex, tok = fake(max_slots=3, vocab_size=vocab, **VARIANTS[variant])
    ends = (ex.reference(tok.encode(PROMPTS[0]).ids, 40)[0][6], ex.reference(tok.encode(PROMPTS[5]).ids, 1)[0][0])
    jobs = [(p, 10 + 3 * i, i % 2 == 0, {"min_tokens": 8} if i % 2 else {}) for i, p in enumerate(PROMPTS)]
    stats = []
    results, texts = _run((ex, tok), jobs, end_ids=ends, stats=stats)
    for i, (prompt, n, _, own) in enumerate(jobs):
        ref, reason = ex.reference(tok.encode(prompt).ids, n, ends, own.get("min_tokens", 0))
        assert texts[i] == _words(ref, reason), f"job {i}"
        assert results[i][-1].finish_reason == reason and results[i][-1].num_output_tokens == len(ref)
    assert any(o[-1].finish_reason == "stop" for o in results.values())
    assert any(o[-1].finish_reason == "length" for o in results.values())
    st = stats[0]
    assert st.tokens == sum(o[-1].num_output_tokens for o in results.values())
    assert (st.chained > 0) == ex.can_chain and (st.mixed_steps > 0) == ex.can_mix
    assert all(step.taken == 1 for step in ex.steps)  # every launched step's tokens taken, once


@pytest.mark.parametrize("variant", ["plain", "chain+mix", "chain+mix+draw"])
def test_mix_prefill_off_and_sampled_rows_give_the_same_answers(variant):
    """Sampled requests (seeded; one with `min_tokens`, whose ban reaches drawn rows), penalised ones
    (greedy and sampled) and greedy ones in one batch. Without `can_sample` the steps with sampled or
    penalised rows bring the logits to the host and the others stay greedy (and chain where they can);
    with it the engine chooses them (its own token counts for the penalties), and their steps chain
    and carry prompts too. Each answer equals the request's answer alone, with `mix_prefill` on or off,
    and equals what the host's sampler gives (`sample_on_device` off): the same uniform numbers in the
    same order and the same penalties, wherever a token is chosen."""
    kind = {**VARIANTS["chain+mix"], "can_sample": True} if variant == "chain+mix+draw" else VARIANTS[variant]
    ends = (2, 5, 9, 11, 17, 23, 31, 40, 47, 58)  # drawn often: the sampled rows' bans matter
    jobs = [("Once upon a time", 30, True, {"temperature": 0.9, "seed": 1, "min_tokens": 25}), ("The cat", 25, False),
            ("A dog", 20, True, {"temperature": 0.7, "top_k": 5, "seed": 2, "min_tokens": 15}), ("Tom", 35, True),
            ("Lily", 15, False, {"temperature": 1.3, "top_p": 0.8, "seed": 3, "min_tokens": 12}),
            ("Ben and Mia", 40, True, {"frequency_penalty": 1.5, "repetition_penalty": 1.3, "min_tokens": 30}),
            ("Sue", 30, False, {"temperature": 0.8, "presence_penalty": 1.2, "repetition_penalty": 0.8, "seed": 6,
                                "min_tokens": 10})]
    stats = []
    ex = fake(max_slots=2, **kind)
    together = _run(ex, jobs, stats=stats, end_ids=ends)[1]
    unmixed = _run(fake(max_slots=2, **kind), jobs, mix_prefill=False, end_ids=ends)[1]
    solo = {i: _run(fake(**kind), [job], end_ids=ends)[1][0] for i, job in enumerate(jobs)}
    host = _run(fake(max_slots=2, **kind), jobs, sample_on_device=False, end_ids=ends)[1]
    assert together == solo == unmixed == host
    tok = FakeTokenizer()
    assert together[1] == _words(*ex[0].reference(tok.encode("The cat").ids, 25, ends))
    assert together[0] != _words(*ex[0].reference(tok.encode("Once upon a time").ids, 30, ends, 25))  # it sampled
    assert len(together[0].split()) >= 25  # the ban held while drawn
    assert together[5] != _words(*ex[0].reference(tok.encode("Ben and Mia").ids, 40, ends, 30))  # the penalty bit
    if variant == "chain+mix+draw":  # every step drawn on the "device": chained, and prompts in decode steps
        assert ex[0].drawn == stats[0].drawn > 0 and stats[0].chained > 0 and stats[0].mixed_steps > 0
        assert not any(c[0] == "decode" for c in ex[0].calls)  # no step brought its logits to the host
    else:
        assert ex[0].drawn == stats[0].drawn == 0


# -- the courier: merged deltas, priorities, cancellation ----------------------------------------------

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


def test_cancellation_inside_a_chain_with_prompts_in_decode_steps():
    """Streams cancelled while steps are chained end, and their slots serve the requests behind them."""
    stats = []
    results, _ = _run(fake(max_slots=3, can_chain=True, can_mix=True, step_s=0.002),
                      [("Once upon a time", 200, True)] * 4 + [("The cat", 10, False)], cancel_after=3, stats=stats)
    reasons = sorted(outs[-1].finish_reason for outs in results.values())
    assert reasons.count("cancelled") == 4 and results[4][-1].finish_reason == "length"
    assert stats[0].chained > 0 and stats[0].cancelled == 4


def test_stream_interval_sends_fewer_larger_deltas(engine):
    """With an interval, the first token still goes at once, later ones go together; same text."""
    every, every_text = _run(engine, [("Once upon a time", 80, True)])
    held, held_text = _run(engine, [("Once upon a time", 80, True)], stream_interval=0.5)
    assert held_text == every_text
    assert held[0][0].num_output_tokens == 1  # the first token is never held
    assert len(held[0]) < len(every[0]) / 4
    assert held[0][-1].final and held[0][-1].num_output_tokens == 80


def test_courier_sends_first_tokens_and_finals_before_queued_deltas():
    """While the courier is busy, queued deltas of one stream merge into one response, and a first
    token or a final response waiting behind them goes out first; each stream's text stays in order.
    A first token goes alone: what was queued after it follows as its own response."""
    from tritonchat.python_backend.batching.courier import Courier
    from tritonchat.python_backend.batching.detokenize import Release
    from tritonchat.python_backend.batching.sequence import Output, Sequence

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
    courier.post(c, delta(1, [7]))  # queued behind it, but never merged into it
    courier.post(b, delta(1, [6], final=True, finish_reason="length"))  # a final, carries b's queued delta
    gate.set()
    courier.shutdown()
    assert [n for n, _ in sent] == ["d", "c", "c", "b", "a"]
    assert [o.release.window for n, o in sent if n == "c"] == [[5], [7]]
    outs = dict(sent)
    assert outs["a"].release.window == [1, 2, 3] and not outs["a"].final
    assert outs["b"].release.window == [4, 6] and outs["b"].final and outs["b"].finish_reason == "length"
    assert courier.stats.sends == 5 and courier.stats.send_lag_max_s >= 0.1 and courier.stats.send_s >= 0.1


def test_first_token_senders_send_beside_the_courier_and_keep_each_stream_in_order():
    """With first-token senders, a first token goes out while another stream's send still waits
    (without them it waits behind it: the wave of first tokens the senders are for), and a stream's
    later outputs wait for its own first token, then go in order."""
    from tritonchat.python_backend.batching.courier import Courier
    from tritonchat.python_backend.batching.detokenize import Release
    from tritonchat.python_backend.batching.sequence import Output, Sequence

    def run(first_senders):
        sent, gate, lock = [], threading.Event(), threading.Lock()

        def seq(name, blocks=False):
            def sink(out):
                if blocks and out.urgent:
                    gate.wait(10)  # a's first token: its send is slow
                with lock:
                    sent.append((name, out))
            return Sequence(np.zeros(1, np.int64), None, None, sink=sink)

        def out(start, ids, **kw):
            return Output(Release(list(ids), 0, 0, start), 1, start + len(ids), **kw)

        courier = Courier(first_senders=first_senders)
        a, b = seq("a", blocks=True), seq("b")
        courier.post(a, out(0, [1], urgent=True))
        time.sleep(0.05)
        courier.post(b, out(0, [2], urgent=True))
        courier.post(a, out(1, [3]))
        courier.post(a, out(2, [4], final=True, finish_reason="length"))
        time.sleep(0.2)
        before = [n for n, _ in sent]  # what went out while a's first token was held
        gate.set()
        courier.post(b, out(1, [5], final=True, finish_reason="length"))
        courier.shutdown()
        return before, sent, courier

    before, sent, courier = run(first_senders=2)
    assert before == ["b"]  # b's first token went beside a's held one; a's later outputs waited
    windows = {n: [o.release.window for m, o in sent if m == n] for n in "ab"}
    assert windows == {"a": [[1], [3, 4]], "b": [[2], [5]]}  # a's delta merged into its final, after its first
    assert [o.final for n, o in sent if n == "a"] == [False, True]
    assert courier.stats.sends == 4 and not courier.flying
    before, sent, _ = run(first_senders=0)
    assert before == []  # one courier: b's first token waits behind a's send
    assert {n: [o.release.window for m, o in sent if m == n] for n in "ab"} == windows


def test_urgent_sends_go_ahead_of_metric_updates():
    """A first token queued behind a send goes before the metric updates queued with it (each update
    is a message to the server process too), and the updates still run."""
    from tritonchat.python_backend.batching.courier import Courier
    from tritonchat.python_backend.batching.detokenize import Release
    from tritonchat.python_backend.batching.sequence import Output, Sequence

    events, gate = [], threading.Event()

    def sink(name):
        def send(out):
            if name == "a":
                gate.wait(10)
            events.append(name)
        return send

    courier = Courier()
    a, b = (Sequence(np.zeros(1, np.int64), None, None, sink=sink(n)) for n in "ab")
    courier.post(a, Output(Release([1], 0, 0, 0), 1, 1))  # held at the gate
    time.sleep(0.05)
    courier.call(lambda: events.append("metrics"))
    courier.post(b, Output(Release([2], 0, 0, 0), 1, 1, urgent=True))
    gate.set()
    courier.shutdown()
    assert events == ["a", "b", "metrics"]


def test_no_cancellation_poll_while_a_first_token_is_being_sent():
    """The courier never asks about a request while a first-token sender sends on it: two calls
    about one request at once lost cancellations (the entry's flows keep the same rule)."""
    from tritonchat.python_backend.batching.courier import Courier
    from tritonchat.python_backend.batching.detokenize import Release
    from tritonchat.python_backend.batching.sequence import Output, Sequence

    sending, overlaps, polls = threading.Event(), [], []

    def sink(out):
        sending.set()
        time.sleep(0.15)  # several polling rounds
        sending.clear()

    def is_cancelled():
        polls.append(time.perf_counter())
        if sending.is_set():
            overlaps.append(True)
        return False

    courier = Courier(poll_interval=0.01, first_senders=1)
    s = Sequence(np.zeros(1, np.int64), None, None, sink=sink, is_cancelled=is_cancelled)
    courier.watch(s)
    courier.post(s, Output(Release([1], 0, 0, 0), 1, 1, urgent=True))
    time.sleep(0.3)
    courier.post(s, Output(Release([2], 0, 0, 1), 1, 2, final=True, finish_reason="length"))
    courier.shutdown()
    assert polls and not overlaps


@pytest.mark.parametrize("variant", ["plain", "chain+mix"])
def test_answers_and_order_with_first_token_senders(variant):
    """The first-token senders change no answer and no stream's order: streamed texts equal the
    reference with sends slow enough to overlap (each output's token count only grows)."""
    ex, tok = fake(max_slots=4, **VARIANTS[variant])
    jobs = [(p, 12 + 2 * i, True) for i, p in enumerate(PROMPTS)]
    results, texts = _run((ex, tok), jobs, sink_delay=0.002, first_senders=3)
    for i, (prompt, n, _) in enumerate(jobs):
        ref, reason = ex.reference(tok.encode(prompt).ids, n, (2,))
        assert texts[i] == _words(ref, reason), f"job {i}"
        counts = [o.num_output_tokens for o in results[i]]
        assert counts == sorted(counts) and results[i][-1].final


def test_a_request_is_never_polled_after_its_final_response(engine, monkeypatch):
    """The courier watches a request (polls whether it was cancelled) until its final response goes.
    Asking tritonserver about a request after that crashed the server (its response factory is freed
    with the final response), so the courier must watch a request before the loop can finish it: here
    `watch` is slowed down, and each one-token request is finished at once by its prefill."""
    from tritonchat.python_backend.batching.courier import Courier
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.batching.sequence import Sequence

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


# -- admission: shared prefills, prompts inside decode steps, bans ------------------------------------

class _Recording:
    """Wraps an engine: records each prefill_batch's group size; each decode step takes >= `step` s."""

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
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.batching.sequence import Sequence

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


def test_a_request_banning_other_end_ids_is_not_starved():
    """A running stream under `min_tokens` bans its end id inside the step; a request that bans
    another end id cannot share that step's ban, so it gets a prefill of its own at once instead of
    waiting for the first stream to pass its `min_tokens` (or end)."""
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.batching.sequence import Sequence

    ex, tok = fake(max_slots=3, can_chain=True, can_mix=True, step_s=0.002)
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


def test_a_long_prompt_gets_a_prefill_of_its_own_and_the_chain_resumes():
    """A greedy request longer than the engine's `mix_tokens` arriving while a stream decodes cannot
    ride in a decode step: the chain stops for its prefill (shared with the request behind it), then
    goes on; every answer is the request's answer alone."""
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex, tok = fake(max_slots=3, can_chain=True, can_mix=True, mix_tokens=8, step_s=0.002)
    sched = Scheduler(ex)
    jobs = [("Tom", 60), ("Once upon a time there was", 10), ("Lily", 10)]
    outs, finals, sink_of = _collect(3)
    sched.submit(_seq(tok, *jobs[0], sink_of(0)))
    deadline = time.time() + 10
    while len(outs[0]) < 3 and time.time() < deadline:
        time.sleep(0.002)
    for i in (1, 2):
        sched.submit(_seq(tok, *jobs[i], sink_of(i)))
    for _ in range(3):
        assert finals.acquire(timeout=10)
    sched.shutdown()
    assert sched.stats.prefill_calls == 2 and sched.stats.mixed_steps == 0 and ex.prefill_groups == [1, 2]
    chained_after = [c for c in ex.calls[ex.calls.index(("prefill", 2)):] if c[0] == "greedy" and c[3]]
    assert chained_after  # the chain went on after the prefill
    for i, (prompt, n) in enumerate(jobs):
        text = _streamed_text(outs[i])
        assert text == _words(*ex.reference(tok.encode(prompt).ids, n, (2,)))


def test_a_request_arriving_at_the_chain_point_rides_in_the_next_step():
    """The scheduler chooses a chained step's prompts after the engine's `chain_point` on the step
    running (the torch engine's `chain_at`: that far through its layers), not before: a request that
    arrives while it waits there is carried by the very next step launched, and its answer and the
    running stream's are each their own."""
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex, tok = fake(max_slots=3, can_chain=True, can_mix=True, step_s=0.001)
    sched = Scheduler(ex)
    jobs = [("Tom", 40), ("Lily", 10)]
    outs, finals, sink_of = _collect(2)
    arrived, last = [], []

    def arrive(step):  # the 5th wait at the point: the second request comes then
        last.append(step is ex.steps[-1])  # no step launched behind the one it waits on
        if sum(c[0] == "chain_point" for c in ex.calls) == 5:
            arrived.append(len(ex.calls))
            sched.submit(_seq(tok, *jobs[1], sink_of(1)))
    ex.on_chain_point = arrive
    sched.submit(_seq(tok, *jobs[0], sink_of(0)))
    for _ in range(2):
        assert finals.acquire(timeout=10)
    sched.shutdown()
    # every wait is on the step launched last, and the engine call right after the arrival launches the
    # chained step (one decode row) carrying the new prompt
    assert len(last) > 5 and all(last), last
    assert ex.calls[arrived[0]] == ("greedy", 1, 1, True), ex.calls[arrived[0] - 1:arrived[0] + 2]
    for i, (prompt, n) in enumerate(jobs):
        text = _streamed_text(outs[i])
        assert text == _words(*ex.reference(tok.encode(prompt).ids, n, (2,)))


def test_a_stream_cancelled_at_the_chain_point_is_left_out_of_the_next_step():
    """The rows going on are chosen before the wait at the chain point (less host work after it);
    a stream the courier flags as cancelled during that wait is still left out of the very next step,
    gets no more tokens, and the other stream runs to its end."""
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex, tok = fake(max_slots=3, can_chain=True, can_mix=True, step_s=0.001)
    sched = Scheduler(ex)
    outs, finals, sink_of = _collect(2)
    seqs = [_seq(tok, "Tom", 40, sink_of(0)), _seq(tok, "Lily", 40, sink_of(1))]
    flagged = []

    def cancel(step):  # once both run: the courier flags the second during the wait
        if not flagged and ex.calls[-2][:2] == ("greedy", 2):
            flagged.append(len(ex.calls))
            seqs[1].cancelled = True
    ex.on_chain_point = cancel
    for s in seqs:
        sched.submit(s)
    for _ in range(2):
        assert finals.acquire(timeout=10)
    sched.shutdown()
    assert flagged and ex.calls[flagged[0]] == ("greedy", 1, 0, True), ex.calls[flagged[0] - 2:flagged[0] + 2]
    assert outs[1][-1].finish_reason == "cancelled" and outs[0][-1].error is None
    text = _streamed_text(outs[0])
    assert text == _words(*ex.reference(tok.encode("Tom").ids, 40, (2,)))


# -- failures, shutdown, a full line -------------------------------------------------------------------

def _collect(n):
    """n sinks; each one's outputs, and a semaphore released on each final output."""
    outs, finals = [[] for _ in range(n)], threading.Semaphore(0)

    def sink_of(i):
        def sink(out):
            outs[i].append(out)
            if out.final:
                finals.release()
        return sink
    return outs, finals, sink_of


def _streamed_text(outs) -> str:
    """The text a stream's outputs carried (each release's new window, decoded)."""
    return "".join(o.release.window and FakeTokenizer().decode(o.release.window[o.release.read_offset:]) or ""
                   for o in outs if o.release)


def _seq(tok, prompt, n, sink, **params):
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.sequence import Sequence

    return Sequence(np.array(tok.encode(prompt).ids), SamplingParams(max_tokens=n, **{"end_ids": (2,), **params}),
                    TextTracker(tok), sink, stream=True)


@pytest.mark.parametrize("variant", ["plain", "chain+mix"])
def test_an_engine_failure_fails_the_running_batch_and_the_next_request_runs(variant):
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex, tok = fake(fail_after=5, **VARIANTS[variant])
    sched = Scheduler(ex)
    outs, finals, sink_of = _collect(3)
    sched.submit(_seq(tok, "Once upon a time", 50, sink_of(0)))
    sched.submit(_seq(tok, "The cat", 50, sink_of(1)))
    for _ in range(2):
        assert finals.acquire(timeout=10)
    # the message names the failure, never the exception text (an engine's may hold server paths)
    assert [o[-1].error for o in outs[:2]] == ["generator failed: the engine raised RuntimeError during a decode "
                                               "step (details in the server log)"] * 2
    assert all(o[-1].final and o[-1].release is None for o in outs[:2])
    ex.fail_after = None
    sched.submit(_seq(tok, "Tom", 12, sink_of(2)))
    assert finals.acquire(timeout=10)
    sched.shutdown()
    assert outs[2][-1].finish_reason == "length" and outs[2][-1].error is None
    assert sched.free_slots and sorted(sched.free_slots) == list(range(ex.max_slots))


def test_shutdown_answers_running_and_waiting_requests():
    from tritonchat.python_backend.batching.scheduler import Scheduler

    ex, tok = fake(max_slots=1, step_s=0.005)
    sched = Scheduler(ex)
    outs, finals, sink_of = _collect(3)
    for i, prompt in enumerate(("Once upon a time", "The cat", "Tom")):
        sched.submit(_seq(tok, prompt, 200, sink_of(i)))
    deadline = time.time() + 10
    while not outs[0] and time.time() < deadline:
        time.sleep(0.005)
    sched.shutdown()
    for _ in range(3):
        assert finals.acquire(timeout=10)
    assert [o[-1].finish_reason for o in outs] == ["cancelled"] * 3
    assert [o[-1].error for o in outs] == ["server is shutting down"] * 3


def test_a_full_waiting_line_refuses_requests():
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.batching.sequence import QueueFull

    class Gated(FakeEngine):
        def __init__(self):
            super().__init__(max_slots=1)
            self.entered, self.gate = threading.Event(), threading.Event()

        def prefill_batch(self, slots, prompts):
            self.entered.set()
            assert self.gate.wait(10)
            return super().prefill_batch(slots, prompts)

    ex, tok = Gated(), FakeTokenizer()
    sched = Scheduler(ex, max_queue_size=1)
    outs, finals, sink_of = _collect(3)
    sched.submit(_seq(tok, "Once upon a time", 5, sink_of(0)))
    assert ex.entered.wait(10)  # the first is in its prefill: the line is empty again
    sched.submit(_seq(tok, "The cat", 5, sink_of(1)))
    with pytest.raises(QueueFull, match="generator queue is full"):
        sched.submit(_seq(tok, "Tom", 5, sink_of(2)))
    ex.gate.set()
    for _ in range(2):
        assert finals.acquire(timeout=10)
    sched.shutdown()
    assert [o[-1].finish_reason for o in outs[:2]] == ["length"] * 2 and not outs[2]


def test_a_burst_before_any_admission_fills_the_free_slots_and_the_line():
    """Requests arriving together, before the loop admits any: the free slots take as many as they
    hold, the waiting line its own length, and only the rest are refused."""
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.batching.sequence import QueueFull

    ex, tok = FakeEngine(max_slots=2), FakeTokenizer()
    sched = Scheduler(ex, max_queue_size=1)
    outs, finals, sink_of = _collect(4)
    with sched._cv:  # the loop cannot admit while we hold its lock: all four arrive "at once"
        for i in range(3):
            sched.submit(_seq(tok, "Once upon a time", 5, sink_of(i)))
        with pytest.raises(QueueFull, match="generator queue is full"):
            sched.submit(_seq(tok, "Tom", 5, sink_of(3)))
    for _ in range(3):
        assert finals.acquire(timeout=10)
    sched.shutdown()
    assert [o[-1].finish_reason for o in outs[:3]] == ["length"] * 3 and not outs[3]


# -- metrics: the hooks run on the courier's thread and add up to the scheduler's counters ------------

@pytest.mark.parametrize("variant", ["plain", "chain+mix"])
def test_metrics_hooks_add_up_and_run_on_the_courier_thread(variant):
    from tritonchat.python_backend.batching.scheduler import Scheduler

    class Metrics:
        def __init__(self):
            self.threads, self.tokens, self.steps, self.ttft, self.reasons, self.itl = set(), 0, 0, [], [], []

        def step(self, running, waiting, new_tokens, steps=1):
            self.threads.add(threading.current_thread().name)
            self.tokens += new_tokens
            self.steps += steps

        def first_token(self, seconds):
            self.threads.add(threading.current_thread().name)
            self.ttft.append(seconds)

        def finished(self, reason, seconds, itl=None):
            self.threads.add(threading.current_thread().name)
            self.reasons.append(reason)
            self.itl.append(itl)

    ex, tok = fake(max_slots=2, step_s=0.001, **VARIANTS[variant])
    metrics = Metrics()
    sched = Scheduler(ex, metrics=metrics)
    outs, finals, sink_of = _collect(4)
    for i, (prompt, n) in enumerate((("Once upon a time", 30), ("The cat", 1), ("A dog", 20), ("Tom", 25))):
        sched.submit(_seq(tok, prompt, n, sink_of(i)))
    for _ in range(4):
        assert finals.acquire(timeout=10)
    sched.shutdown()
    assert metrics.threads == {"tritonchat-courier"}
    assert len(metrics.ttft) == 4 and all(t > 0 for t in metrics.ttft)
    assert sorted(metrics.reasons) == sorted(o[-1].finish_reason for o in outs)
    assert metrics.tokens == sched.stats.tokens == sum(o[-1].num_output_tokens for o in outs)
    assert metrics.steps == sched.stats.steps
    # the mean inter-token time of each request of two tokens or more ("The cat" asked for one)
    assert sum(i is None for i in metrics.itl) == 1 and all(i > 0 for i in metrics.itl if i is not None)


def test_the_waiting_gauge_drops_a_request_cancelled_while_it_waited():
    """A request cancelled in the waiting line leaves it when a slot frees; the last report of the
    load must then say 0 waiting, also when no other request was admitted with it (seen: the gauge
    stayed at 1 with the scheduler idle)."""
    from tritonchat.python_backend.batching.scheduler import Scheduler

    class Metrics:
        def __init__(self):
            self.loads = []

        def step(self, running, waiting, new_tokens, steps=1):
            self.loads.append((running, waiting))

        def first_token(self, seconds):
            pass

        def finished(self, reason, seconds, itl=None):
            pass

    ex, tok = fake(max_slots=1, step_s=0.002)
    metrics = Metrics()
    sched = Scheduler(ex, metrics=metrics)
    outs, finals, sink_of = _collect(2)
    sched.submit(_seq(tok, "Once upon a time", 30, sink_of(0)))
    waiting = _seq(tok, "The cat", 5, sink_of(1))
    sched.submit(waiting)
    waiting.cancelled = True  # as the entry's control request does (generator._cancel)
    for _ in range(2):
        assert finals.acquire(timeout=10)
    deadline = time.monotonic() + 5
    while (not metrics.loads or metrics.loads[-1] != (0, 0)) and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.shutdown()
    assert outs[1][-1].finish_reason == "cancelled"
    assert metrics.loads[-1] == (0, 0), metrics.loads[-5:]

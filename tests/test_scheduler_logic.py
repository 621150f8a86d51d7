"""The scheduler's logic on the deterministic fake engine (tests/fake_engine.py): fast, no model files,
no torch; the chained and mixed paths run on CPU through the fake's `can_chain` / `can_mix`. (The
courier's in tests/test_courier.py; tests/test_scheduler.py checks answers against real engines.)"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fake_engine import PROMPTS, VARIANTS, FakeEngine, FakeTokenizer, fake, run_jobs
from fake_engine import answer_text as _words

_run = run_jobs


@pytest.fixture
def engine():
    """A plain engine (no chaining, no prompts in decode steps) whose steps take 2 ms, as a small
    model's do on CPU: long enough for a client's cancellation or a late request to land mid-answer."""
    return fake(step_s=0.002)


# -- answers: every path gives each request its answer alone ---------------------------------------

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

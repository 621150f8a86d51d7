"""The courier (python_backend/batching/courier.py) on the deterministic fake engine (tests/fake_engine.py):
merged deltas for a slow client, the stream interval, first tokens and finals ahead of queued deltas,
first-token senders beside it, urgent sends ahead of metric updates, cancellation polls (never during a
first token's send, never after a final response), and cancellation freeing slots, chained or not."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fake_engine import PROMPTS, VARIANTS, fake
from fake_engine import answer_text as _words
from fake_engine import run_jobs as _run


@pytest.fixture
def engine():
    """A plain engine whose steps take 2 ms, as a small model's do on CPU: long enough for a client's
    cancellation or a late request to land mid-answer."""
    return fake(step_s=0.002)


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

"""Prefix reuse (python_backend/batching/prefix.py): the slot a prompt goes into, the tokens it
reuses, on the deterministic fake engine (tests/fake_engine.py, which refuses a claimed prefix its
slot does not hold); and on the ONNX Runtime engine with stories260K, where a prefill on top of a
cached prefix must give bitwise the logits of a full prefill, so greedy answers never change.
(The same through the real tritonserver: tests/test_prefix_reuse_e2e.py.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fake_engine import FakeEngine, FakeTokenizer
from tritonchat.python_backend.batching.prefix import USEFUL, PrefixCache, common_prefix


def _scheduler(engine, **kw):
    from tritonchat.python_backend.batching.scheduler import Scheduler

    return Scheduler(engine, **kw)


def _ask(sched, prompt, max_tokens=12, stream=False, **params):
    """Submit one request of token ids; wait for its answer (ids, finish reason)."""
    from tritonchat.python_backend.batching.detokenize import TextTracker
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.sequence import Sequence

    outs, done = [], threading.Event()

    def sink(out):
        outs.append(out)
        if out.final:
            done.set()

    sched.submit(Sequence(np.asarray(prompt, dtype=np.int64), SamplingParams(max_tokens=max_tokens, end_ids=(), **params),
                          TextTracker(FakeTokenizer(sched.engine.vocab_size)), sink, stream=stream))
    return outs, done


def _answer(sched, prompt, max_tokens=12):
    outs, done = _ask(sched, prompt, max_tokens)
    assert done.wait(30)
    final = outs[-1]
    assert final.error is None, final.error
    return final.release.window[final.release.read_offset:] if final.release else [], final.finish_reason


def _ids(rng, n, vocab=64):
    return [int(t) for t in rng.integers(3, vocab, n)]


# -- the choice of slot: PrefixCache alone ------------------------------------------------------------

def test_common_prefix():
    a = np.array([1, 2, 3, 4, 5])
    assert common_prefix(a, np.array([1, 2, 3, 9]), 10) == 3
    assert common_prefix(a, a, 10) == 5 and common_prefix(a, a, 3) == 3 and common_prefix(a, a, 0) == 0
    assert common_prefix(None, a, 10) == 0 and common_prefix(a, np.array([7]), 10) == 0


def test_a_prompt_takes_the_slot_of_its_longest_prefix_else_the_least_recently_freed():
    cache = PrefixCache(min_new=2)
    base = np.arange(100, 130)
    cache.held = {0: base[:20], 1: base[:25], 2: np.arange(200, 240), 3: base[:25]}
    free = [2, 3, 0, 1]  # freed in this order: 2 first
    # the longest prefix (25 tokens in slots 1 and 3): the one freed first among the two, 3
    assert cache.take(free, base) == (3, 25, None) and free == [2, 0, 1]
    # a prompt of 26 tokens: at least 2 must be computed, so 24 are reused
    assert cache.take(free, base[:26]) == (1, 24, None) and free == [2, 0]
    # nothing useful (a match shorter than USEFUL): the least recently freed slot, 2, whatever it holds
    short = np.concatenate([base[:USEFUL - 1], [1, 2, 3]])
    assert cache.take(free, short) == (2, 0, None) and free == [0]
    cache.prefilled(2, short)


def test_a_longer_prefix_in_another_slot_is_copied():
    cache = PrefixCache(min_new=2)
    system = np.arange(100, 100 + 3 * USEFUL)
    cache.held = {0: np.concatenate([system, [1, 2]]),  # a running request's prompt
                  1: np.arange(200, 240)}  # free, holds another conversation
    free = [1]
    slot, reused, source = cache.take(free, np.concatenate([system, [7, 8, 9]]))
    assert (slot, reused, source) == (1, len(system), 0)
    assert np.array_equal(cache.held[1], system)  # valid once the copy is made
    # a longer prefix by fewer than USEFUL tokens is not worth a copy
    cache.held = {0: system, 1: system[:-(USEFUL - 1)]}
    free = [1]
    assert cache.take(free, np.concatenate([system, [7, 8]])) == (1, len(system) - USEFUL + 1, None)


def _scan_every_slot(held: dict, free_slots: list, prompt: np.ndarray, min_new: int):
    """The choice as PrefixCache made it before its index: every slot compared with the prompt."""
    cap = len(prompt) - min_new
    found = [common_prefix(held.get(s), prompt, cap) for s in free_slots]
    best = max(range(len(found)), key=lambda i: (found[i], -i))
    if found[best] < USEFUL:
        best = 0
    slot, reused = free_slots[best], found[best]
    source, longest = None, reused + USEFUL - 1
    for other, ids in held.items():
        n = common_prefix(ids, prompt, cap) if other != slot else 0
        if n > longest:
            source, longest = other, n
    return best, (longest if source is not None else reused), source


def test_the_indexed_choice_is_the_choice_of_a_scan_of_every_slot():
    """Placing a prompt compares it only with the slots whose prefix starts as it does; the slot,
    the tokens reused and the slot copied from are what comparing it with every slot gives, ties,
    matches shorter than USEFUL (BOS alone) and prompts too short to reuse included."""
    rng = np.random.default_rng(11)
    systems = [rng.integers(3, 6, 3 * USEFUL) for _ in range(3)]  # a small vocabulary: many ties

    def ids():
        head = systems[rng.integers(3)][:rng.integers(0, 3 * USEFUL + 1)]
        return np.concatenate([[1], head, rng.integers(3, 6, rng.integers(0, 12))]).astype(np.int64)

    checked = copies = 0
    for _ in range(300):
        cache = PrefixCache(min_new=int(rng.integers(1, 3)))
        cache.held = {s: ids() for s in rng.permutation(12)[:rng.integers(0, 12)]}
        for _ in range(4):  # the index follows the held prefixes as prompts are taken and prefilled
            free = [int(s) for s in rng.permutation(12)[:rng.integers(1, 9)]]
            prompt = ids()
            best, *want = _scan_every_slot(dict(cache.held), free, prompt, cache.min_new)
            want_slot = free[best]
            slot, reused, source = cache.take(free, prompt)
            assert (slot, reused, source) == (want_slot, *want) and want_slot not in free
            checked += 1
            copies += source is not None
            if rng.integers(2):
                cache.prefilled(slot, prompt)
            elif rng.integers(2):
                cache.forget(slot)
    assert checked == 1200 and copies > 50


# -- the scheduler on the fake engine ------------------------------------------------------------------

def test_each_turn_of_a_conversation_reuses_the_previous_prompt_and_answers_are_unchanged():
    """Turn k+1's prompt is turn k's prompt, its answer and a new message: it lands in turn k's slot
    and reuses that prompt's KV (never the answer's: decode steps wrote it, see prefix.py); the
    answers equal the fake model's reference, and the stats and metric hook count the tokens."""
    rng = np.random.default_rng(0)
    ex = FakeEngine(max_slots=3, can_reuse=True)

    class Metrics:
        reused_tokens = 0

        def step(self, *a):
            pass

        def first_token(self, s):
            pass

        def finished(self, *a):
            pass

        def reused(self, n):
            self.reused_tokens += n

    metrics = Metrics()
    sched = _scheduler(ex, metrics=metrics)
    prompt, expected = _ids(rng, 20), []
    try:
        for turn in range(4):
            answer, reason = _answer(sched, prompt)
            assert (answer, reason) == ex.reference(prompt, 12)
            slot, cached = ex.reused[-1]
            expected.append(cached)
            if turn:
                assert slot == first_slot and cached == previous
            else:
                first_slot = slot
            previous = len(prompt)
            prompt = prompt + answer + _ids(rng, 5)
    finally:
        sched.shutdown()
    assert expected[0] == 0 and all(c > 0 for c in expected[1:])
    assert sched.stats.reused_tokens == sum(expected) == metrics.reused_tokens
    assert sched.stats.reused_prefills == 3 and sched.stats.copied_tokens == 0


def test_conversations_keep_their_slots_and_new_prompts_take_the_oldest():
    """Three conversations in 4 slots, turns interleaved: each turn reuses its own conversation's
    slot; an unrelated prompt takes the never-used slot, then the least recently freed one."""
    rng = np.random.default_rng(1)
    ex = FakeEngine(max_slots=4, can_reuse=True)
    sched = _scheduler(ex)
    convs = [_ids(rng, 16) for _ in range(3)]
    slots, previous = {}, [0, 0, 0]
    try:
        for turn in range(3):
            for c in range(3):
                answer, _ = _answer(sched, convs[c])
                slot, cached = ex.reused[-1]
                assert slots.setdefault(c, slot) == slot and cached == previous[c]
                previous[c] = len(convs[c])
                convs[c] = convs[c] + answer + _ids(rng, 4)
        _answer(sched, [1] * 16)
        assert ex.reused[-1] == (({0, 1, 2, 3} - set(slots.values())).pop(), 0)  # the slot no one used
        _answer(sched, [2] * 16)
        assert ex.reused[-1] == (slots[0], 0)  # conversation 0's slot was freed longest ago
    finally:
        sched.shutdown()


def test_an_identical_prompt_reuses_all_but_the_tokens_the_engine_must_compute():
    rng = np.random.default_rng(2)
    prompt = _ids(rng, 30)
    for min_new in (1, 2):
        ex = FakeEngine(max_slots=2, can_reuse=True, reuse_min_new=min_new)
        sched = _scheduler(ex)
        try:
            first = _answer(sched, prompt)
            again = _answer(sched, prompt)
        finally:
            sched.shutdown()
        assert first == again == ex.reference(prompt, 12)
        assert ex.reused[-1][1] == len(prompt) - min_new


def test_a_running_requests_system_prompt_is_copied_into_a_new_slot():
    """A long request runs with a system prompt; another one with the same system prompt comes while
    the only free slot holds nothing of it: the KV of the system prompt is copied from the running
    slot (the fake engine checks the copy and the claimed prefix), and both answers are unchanged."""
    rng = np.random.default_rng(3)
    ex = FakeEngine(max_slots=2, can_reuse=True, step_s=0.002)
    sched = _scheduler(ex)
    system = _ids(rng, 24)
    first, second = system + [1] * 6, system + [2] * 7
    try:
        outs, done = _ask(sched, first, 200, stream=True)
        while not outs:
            done.wait(0.01)
        assert _answer(sched, second) == ex.reference(second, 12)
        assert done.wait(30)
    finally:
        sched.shutdown()
    src = ex.reused[0][0]
    assert ex.copies == [(src, 1 - src, len(system))] and ex.reused[1] == (1 - src, len(system))
    assert sched.stats.copied_tokens == len(system) == sched.stats.reused_tokens


def test_a_prompt_carried_inside_a_decode_step_is_reused_by_a_later_prefill():
    """An engine that runs greedy prompts inside decode steps (the torch engine) computes them whole
    there, and their KV counts as a prefill's: a later sampled request (prefilled on its own) that
    continues the prompt reuses it."""
    rng = np.random.default_rng(5)
    ex = FakeEngine(max_slots=3, can_chain=True, can_mix=True, can_reuse=True, step_s=0.002)
    sched = _scheduler(ex)
    prompt = _ids(rng, 20)
    try:
        outs, done = _ask(sched, _ids(rng, 8), 200, stream=True)  # keeps a decode step running
        while not outs:
            done.wait(0.01)
        assert _answer(sched, prompt) == ex.reference(prompt, 12)
        assert any(c[0] == "greedy" and c[2] == 1 for c in ex.calls)  # it rode inside a step
        later = _ask(sched, prompt + [5, 6, 7], 6, temperature=0.8, seed=1)
        assert later[1].wait(30) and later[0][-1].error is None
        assert done.wait(30)
    finally:
        sched.shutdown()
    assert ex.reused[-1][1] == len(prompt) and sched.stats.reused_tokens == len(prompt), ex.reused


def test_a_turn_carried_inside_a_decode_step_reuses_the_previous_prompt():
    """A conversation's next turn that rides inside a decode step (while another stream runs) goes
    into the slot holding its previous prompt's KV and the step computes only the tokens after it,
    as a prefill of its own would: the answer is unchanged."""
    rng = np.random.default_rng(9)
    ex = FakeEngine(max_slots=3, can_chain=True, can_mix=True, can_reuse=True, step_s=0.002)
    sched = _scheduler(ex)
    turn1 = _ids(rng, 20)
    try:
        answer = _answer(sched, turn1)  # nothing running: a prefill of its own
        outs, done = _ask(sched, _ids(rng, 8), 200, stream=True)  # keeps a decode step running
        while not outs:
            done.wait(0.01)
        riding = sum(c[0] == "greedy" and c[2] == 1 for c in ex.calls)
        turn2 = turn1 + answer[0] + _ids(rng, 5)
        assert _answer(sched, turn2) == ex.reference(turn2, 12)
        assert sum(c[0] == "greedy" and c[2] == 1 for c in ex.calls) == riding + 1  # it rode inside a step
        assert done.wait(30)
    finally:
        sched.shutdown()
    assert ex.reused[0][0] == ex.reused[-1][0] and ex.reused[-1][1] == len(turn1), ex.reused
    assert sched.stats.reused_tokens == len(turn1)


def test_cached_prompts_admitted_together_run_one_at_a_time_shortest_first():
    """On an engine that runs cached prompts one after another (ONNX Runtime), an admission of
    several goes to it one prompt per call, the fewest tokens to compute first, so each first token
    is posted when its own prefill ends; answers unchanged."""
    rng = np.random.default_rng(7)
    ex = FakeEngine(max_slots=4, can_reuse=True, step_s=0.002)
    assert not ex.batches_cached_prefills
    sched = _scheduler(ex, prefill_wait=5.0)  # with one running, admit when all three wait
    turns = [_ids(rng, 12), _ids(rng, 14), _ids(rng, 16)]
    more = [_ids(rng, 9), _ids(rng, 3), _ids(rng, 6)]
    try:
        for t in turns:
            _answer(sched, t)
        outs, done = _ask(sched, _ids(rng, 5), 200, stream=True)  # keeps a decode step running
        while not outs:
            done.wait(0.01)
        before = len(ex.calls)
        asks = [_ask(sched, t + m, 12) for t, m in zip(turns, more)]
        for (o, d), t, m in zip(asks, turns, more):
            assert d.wait(30) and o[-1].error is None
            assert list(o[-1].release.window[o[-1].release.read_offset:]) == list(ex.reference(t + m, 12)[0])
        assert done.wait(30)
    finally:
        sched.shutdown()
    prefills = [c for c in ex.calls[before:] if c[0] == "prefill"]
    assert prefills == [("prefill", 1)] * 3, prefills
    assert [c for _, c in ex.reused[-3:]] == [len(turns[1]), len(turns[2]), len(turns[0])]  # 3, 6, 9 new tokens


def test_a_failed_copy_falls_back_to_a_whole_prefill():
    """Where copying a cached prefix fails, the request is not lost: its prompt is prefilled whole."""
    rng = np.random.default_rng(3)
    ex = FakeEngine(max_slots=2, can_reuse=True, step_s=0.002)

    def broken(src, dst, n):
        raise RuntimeError("copy failed")

    ex.copy_prefix = broken
    sched = _scheduler(ex)
    system = _ids(rng, 24)
    try:
        outs, done = _ask(sched, system + [1] * 6, 200, stream=True)
        while not outs:
            done.wait(0.01)
        assert _answer(sched, system + [2] * 7) == ex.reference(system + [2] * 7, 12)
        assert done.wait(30)
    finally:
        sched.shutdown()
    assert ex.reused[1][1] == 0 and sched.stats.copied_tokens == sched.stats.reused_tokens == 0


def test_a_failed_step_forgets_the_slots_kv_and_reuse_off_reuses_nothing():
    rng = np.random.default_rng(4)
    prompt = _ids(rng, 20)
    ex = FakeEngine(max_slots=1, can_reuse=True, fail_after=3)
    sched = _scheduler(ex)
    try:
        outs, done = _ask(sched, prompt, 20)
        assert done.wait(30) and outs[-1].error
        ex.fail_after = None
        assert _answer(sched, prompt) == ex.reference(prompt, 12)
        assert ex.reused[-1] == (0, 0)  # the failed sequence's slot was not trusted
        assert _answer(sched, prompt) == ex.reference(prompt, 12)
        assert ex.reused[-1] == (0, len(prompt) - 2)
    finally:
        sched.shutdown()
    ex = FakeEngine(max_slots=1, can_reuse=True)
    sched = _scheduler(ex, prefix_reuse=False)
    try:
        for _ in range(2):
            assert _answer(sched, prompt) == ex.reference(prompt, 12)
    finally:
        sched.shutdown()
    assert [c for _, c in ex.reused] == [0, 0] and sched.stats.reused_tokens == 0


@pytest.mark.parametrize("variant", [{}, {"can_chain": True, "can_mix": True}])
def test_many_conversations_at_once_give_their_answers_alone(variant):
    """12 conversations of 4 turns, 4 clients at once over 3 slots (slots are taken from each other's
    conversations, prompts copied and reused in every mix): every answer is the reference's, with
    prompts inside decode steps (`can_mix`) too."""
    ex = FakeEngine(max_slots=3, can_reuse=True, step_s=0.001, **variant)
    sched = _scheduler(ex)
    system = _ids(np.random.default_rng(5), 12)
    wrong, lock = [], threading.Lock()

    def client(k):
        rng = np.random.default_rng(100 + k)
        for c in range(3):
            prompt = system + _ids(rng, int(rng.integers(3, 12)))
            for _ in range(4):
                n = int(rng.integers(1, 15))
                got = _answer(sched, prompt, n)
                if got != ex.reference(prompt, n):
                    with lock:
                        wrong.append((k, c, prompt))
                prompt = prompt + got[0] + _ids(rng, int(rng.integers(2, 6)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sched.shutdown()
    assert not wrong
    assert sched.stats.prefills == 48 and sched.stats.reused_tokens > 0


# -- the ONNX Runtime engine (stories260K) -------------------------------------------------------------

@pytest.fixture(scope="module")
def ort_engine(tmp_path_factory):
    from tritonchat.build.export import export_onnx, load_model, write_spec
    from tritonchat.python_backend.engines.ort import OrtEngine
    from e2e_helpers import STORIES, need

    need(STORIES)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    write_spec(export_onnx(load_model(str(STORIES)), out), out.parent / "kv_spec.json")
    return OrtEngine(out, max_slots=4, max_seq_len=512)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-weight-only"])
def test_a_prefill_on_a_cached_prefix_is_bitwise_a_full_prefill(graphs, precision):
    """Every precision the build writes; prompts of 8 to 300 tokens, prefixes of every kind (a
    prefill's, a copied one): the logits and the KV of a prefill on the cached prefix are bitwise
    those of a full prefill, for 2 new tokens or more; the engine refuses to compute fewer (one row
    runs another kernel path: engines/ort.py)."""
    from tritonchat.python_backend.engines.ort import OrtEngine

    ex = OrtEngine(graphs[precision], max_slots=4, max_seq_len=512)
    rng = np.random.default_rng(6)
    for trial in range(30):
        n = int(rng.integers(8, 300))
        ids = rng.integers(3, ex.vocab_size, n)
        cached = int(rng.integers(1, n - 1))
        full = ex.prefill(0, ids).copy()
        ex.release(0)
        ex.prefill(1, ids[:cached if trial % 2 else cached + int(rng.integers(0, n - cached - 1))])
        if trial % 3 == 0:  # the prefix copied into another slot first
            ex.release(1)
            ex.copy_prefix(1, 2, cached)
            slot = 2
        else:
            ex.release(1)
            slot = 1
        got = ex.prefill_cached([slot], [ids], [cached])[0]
        assert np.array_equal(got, full), f"trial {trial}: n {n}, cached {cached}, {np.abs(got - full).max()}"
        for store in ex.cache:
            assert np.array_equal(store[slot, :, :n], store[0, :, :n])
        for s in range(3):
            ex.release(s)
    ex.prefill(0, ids)
    ex.release(0)
    with pytest.raises(ValueError, match="at least 2 must be computed"):
        ex.prefill_cached([0], [ids], [len(ids) - 1])
    with pytest.raises(ValueError, match="cannot reuse"):
        ex.prefill_cached([3], [ids], [5])  # slot 3 never held anything


def test_multi_turn_answers_are_the_same_with_and_without_reuse(ort_engine):
    """8 conversations of 4 turns (growing history, a shared system prompt), 3 clients at once:
    the greedy answers with prefix reuse equal those without, token for token."""
    from tokenizers import Tokenizer

    from e2e_helpers import STORIES

    tok = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
    system = tok.encode("Once upon a time, there was a little girl named Lily. She loved to play outside.").ids
    users = ["Tom came to play.", "They found a big red ball.", "The sun was hot.", "Mom called them home.",
             "A dog ran by.", "It started to rain.", "The cat was sad.", "Ben had a toy car."]

    def run(reuse: bool):
        sched = _scheduler(ort_engine, prefix_reuse=reuse)
        answers = {}

        def client(k):
            for c in range(k, len(users), 3):
                prompt = list(system)
                for turn in range(4):
                    prompt += tok.encode(users[(c + turn) % len(users)], add_special_tokens=False).ids
                    got, _ = _answer(sched, prompt, 16)
                    answers[(c, turn)] = got
                    prompt += got

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            sched.shutdown()
        return answers, sched.stats

    with_reuse, stats = run(True)
    without, off = run(False)
    assert len(with_reuse) == 32 and with_reuse == without
    assert stats.reused_tokens > 0 and stats.reused_prefills >= 24 and off.reused_tokens == 0


def test_the_build_setting_is_a_boolean_and_reaches_the_generator_config(tmp_path):
    from tritonchat.build.repository import template_dir, template_values
    from tritonchat.build.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="models.generator.prefix_reuse must be true or false, got 'yes'"):
        load_settings(models={"generator": {"prefix_reuse": "yes"}})
    config = (template_dir() / "generator" / "config.pbtxt").read_text()
    for value in (True, False):
        values = template_values(load_settings(models={"generator": {"prefix_reuse": value}}), max_seq_len=64,
                                 engine="onnxruntime", model_file="model.onnx")
        assert values["generator_prefix_reuse"] == str(value).lower()
    assert 'key: "prefix_reuse", value: { string_value: "${generator_prefix_reuse}" }' in config


def test_prompts_with_nothing_cached_are_prefilled_together_beside_the_cached_ones():
    """One admission of three prompts, one of them on a cached prefix: the two with nothing cached go
    to the engine as one batched prefill and the cached one on its prefix (an engine may run cached
    prompts one at a time: ONNX Runtime's fused graph must), not all three one by one; each gets its
    own logits, in the order the scheduler returns."""
    from tritonchat.python_backend.batching.sequence import Sequence

    rng = np.random.default_rng(3)
    ex = FakeEngine(max_slots=4, can_reuse=True)
    sched = _scheduler(ex)
    kinds = []
    batch_real, cached_real = ex.prefill_batch, ex.prefill_cached
    ex.prefill_batch = lambda slots, prompts: kinds.append(("batch", list(slots))) or batch_real(slots, prompts)
    ex.prefill_cached = lambda slots, prompts, cached: (kinds.append(("cached", list(slots)))
                                                        or cached_real(slots, prompts, cached))
    try:
        old = _ids(rng, 10)
        ex.prefill(0, old)
        ex.release(0)
        prompts = [np.array(old + _ids(rng, 4)), np.array(_ids(rng, 7)), np.array(_ids(rng, 9))]
        seqs = [Sequence(p, None, None, sink=lambda out: None) for p in prompts]
        for seq, slot, reused in zip(seqs, [0, 1, 2], [10, 0, 0]):
            seq.slot, seq.reused = slot, reused
        got, rows = sched._prefill(seqs)
    finally:
        sched.shutdown()
    assert kinds == [("batch", [1, 2]), ("cached", [0])]
    assert got == [seqs[1], seqs[2], seqs[0]]
    for seq, row in zip(got, rows):
        assert np.array_equal(row, ex.logits_of(ex.state[seq.slot]))

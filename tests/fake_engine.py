"""A deterministic `Engine` for scheduler tests: no model, no torch, CPU, instant (or `step_s` slow).

A slot's next-token logits are a pure function of every token the slot holds (a running hash of its
history), so a sequence's greedy answer depends only on its own prompt: `FakeEngine.reference` gives
it without a scheduler, and a token fed to the wrong slot, fed twice or lost changes every later
one. The logits of hash target `t` are `-((v - t) % vocab)`: the argmax is `t`, and where a ban masks
`t` the next id up wins (the reference follows the same rule).

`can_chain` / `can_mix` switch on the engine features the scheduler's chained and mixed paths use
(`decode_greedy_begin(chain=...)`, `decode_greedy_begin(prompts=...)`), with the torch engine's
rules checked on every call: a chained step's rows must be slots the previous step wrote, prompts go
into empty slots only, never past the context. `calls` records every engine call.

`can_sample` lets the engine draw the tokens of sampled rows and apply penalties
(`decode_greedy_begin(draws=...)`), with the host's own `penalize` and `draw_tokens` on its logits and
token counts kept as the torch engine keeps them (`track`: the prompt; then every token a decode step
feeds a tracked slot): a seeded answer must not change with where its tokens are chosen.

`can_reuse` switches on prefix reuse (`prefill_cached`, `copy_prefix`): a slot remembers the tokens it
was fed (kept after `release`), and a prefill that claims to reuse a prefix the slot does not hold,
or leaves fewer than `reuse_min_new` tokens to compute, raises; `reused` logs (slot, cached tokens)
of every prefill and `copies` every copy, so tests check the slot choice and the reused length.

`FakeTokenizer` decodes id `i` to " t{i}" (text for `TextTracker` and `detokenize.delta`), and
`run_jobs` drives a scheduler with a list of jobs (with this engine or a real one).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from tritonchat.python_backend.engines.base import Engine, draw_tokens, penalize

_MASK = (1 << 64) - 1


def _mix(state: int, token: int) -> int:
    return (state * 6364136223846793005 + int(token) + 1442695040888963407) & _MASK


class FakeStep:
    """A launched greedy step: its ids (decode rows, then the prompts' first tokens) and the slots
    they belong to."""

    def __init__(self, ids: np.ndarray, slots: np.ndarray):
        self.ids, self.slots = ids, slots
        self.taken = 0  # how many times the scheduler asked for its tokens

    def result(self) -> np.ndarray:
        self.taken += 1
        return self.ids


class FakeEngine(Engine):
    def __init__(self, max_slots: int = 4, max_seq_len: int = 256, vocab_size: int = 64, *,
                 can_chain: bool = False, can_mix: bool = False, mix_tokens: int = 64, mix_prompts: int = 8,
                 step_s: float = 0.0, fail_after: int | None = None, can_reuse: bool = False,
                 reuse_min_new: int = 2, can_sample: bool = False):
        """`step_s`: seconds each decode step and prefill call takes (sleeping, the GIL free).
        `fail_after`: decode steps after which every decode step raises (an engine failure)."""
        self.max_slots, self.max_seq_len, self.vocab_size = max_slots, max_seq_len, vocab_size
        self.can_chain, self.can_mix, self.can_sample = can_chain, can_mix, can_sample
        self.drawn = 0  # tokens drawn by this engine (decode_greedy_begin's `draws`)
        self.counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # tracked slot -> (seen, output counts)
        self.mix_tokens, self.mix_prompts = (mix_tokens, mix_prompts) if can_mix else (0, 0)
        self.step_s, self.fail_after = step_s, fail_after
        self.can_reuse = self.can_reuse_prefix = can_reuse
        self.reuse_min_new = reuse_min_new
        self.state = [0] * max_slots  # hash of each slot's tokens
        self.lengths = [0] * max_slots
        self.tokens: list[list[int]] = [[] for _ in range(max_slots)]  # each slot's tokens (its "KV")
        self.reused: list[tuple[int, int]] = []  # (slot, cached tokens) of every prefill (in a step too)
        self.copies: list[tuple[int, int, int]] = []  # (src, dst, n) of every copy_prefix
        self.calls: list[tuple] = []  # ("prefill", n) | ("decode", rows) | ("greedy", rows, prompts, chained)
        self.steps: list[FakeStep] = []

    # -- the model ---------------------------------------------------------------------------
    def target(self, state: int) -> int:
        return (state >> 33) % self.vocab_size

    def logits_of(self, state: int) -> np.ndarray:
        v = np.arange(self.vocab_size)
        return -((v - self.target(state)) % self.vocab_size).astype(np.float32)

    def reference(self, prompt, max_tokens: int, end_ids=(), min_tokens: int = 0) -> tuple[list[int], str]:
        """A greedy request's answer alone (tokens, finish reason), as the scheduler must give it."""
        state = 0
        for t in prompt:
            state = _mix(state, t)
        limit, out = min(max_tokens, self.max_seq_len - len(prompt)), []
        while True:
            banned = set(end_ids) if len(out) < min_tokens else set()
            tok = self.target(state)
            while tok in banned:
                tok = (tok + 1) % self.vocab_size
            out.append(tok)
            if tok in end_ids:
                return out, "stop"
            if len(out) >= limit:
                return out, "length"
            state = _mix(state, tok)

    def _feed(self, slot: int, token: int) -> np.ndarray:
        if self.lengths[slot] == 0:
            raise ValueError(f"decode of empty slot {slot}")
        if self.lengths[slot] + 1 > self.max_seq_len:
            raise ValueError("a sequence reached the end of its KV cache")
        self.state[slot] = _mix(self.state[slot], token)
        self.lengths[slot] += 1
        self.tokens[slot].append(int(token))
        return self.logits_of(self.state[slot])

    def _fill(self, slot: int, ids, cached: int = 0) -> np.ndarray:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range")
        if self.lengths[slot] and cached != self.lengths[slot]:  # the next piece of its own prompt only
            raise ValueError(f"prefill into slot {slot}, which holds a sequence")
        if len(ids) == 0 or len(ids) + 1 > self.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens")
        ids = [int(t) for t in ids]
        if cached and (not self.can_reuse or cached > len(ids) - self.reuse_min_new
                       or self.tokens[slot][:cached] != ids[:cached]):
            raise ValueError(f"slot {slot} does not hold the {cached} first tokens of this prompt")
        self.reused.append((slot, cached))
        state = 0
        for t in ids:
            state = _mix(state, t)
        self.state[slot], self.lengths[slot], self.tokens[slot] = state, len(ids), ids
        return self.logits_of(state)

    def _decode_rows(self, slots, tokens) -> list[np.ndarray]:
        slots = [int(s) for s in slots]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot twice in one step: {slots}")
        if self.fail_after is not None and sum(c[0] != "prefill" for c in self.calls) > self.fail_after:
            raise RuntimeError("fake engine failure")
        tokens = np.asarray(tokens).reshape(-1).tolist()
        for s, t in zip(slots, tokens):
            if s in self.counts:  # a tracked slot counts every token fed to it
                self.counts[s][0][t] = True
                self.counts[s][1][t] += 1
        return [self._feed(s, t) for s, t in zip(slots, tokens)]

    def _sleep(self) -> None:
        if self.step_s:
            time.sleep(self.step_s)

    # -- Engine API --------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids) -> np.ndarray:
        return self._fill(int(slot), list(np.asarray(token_ids).reshape(-1)))

    def prefill_batch(self, slots, prompts) -> np.ndarray:
        self.calls.append(("prefill", len(prompts)))
        self._sleep()
        return super().prefill_batch(slots, prompts)

    def prefill_cached(self, slots, prompts, cached) -> np.ndarray:
        if not self.can_reuse:
            return super().prefill_cached(slots, prompts, cached)
        self.calls.append(("prefill", len(prompts)))
        self._sleep()
        return np.stack([self._fill(int(s), list(np.asarray(p).reshape(-1)), int(c))
                         for s, p, c in zip(slots, prompts, cached)])

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        if not self.can_reuse or self.lengths[dst] or src == dst or n > len(self.tokens[src]):
            raise ValueError(f"cannot copy {n} tokens of slot {src} into slot {dst}")
        self.tokens[dst] = self.tokens[src][:n]
        self.copies.append((src, dst, n))

    def decode(self, slots, tokens) -> np.ndarray:
        self.calls.append(("decode", len(slots)))
        self._sleep()
        return np.stack(self._decode_rows(slots, tokens))

    def decode_greedy_begin(self, slots, tokens=None, ban=None, chain=None, prompts=None, draws=None) -> FakeStep:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        new_slots, new_ids, cached = (np.zeros(0, np.int64), [], []) if prompts is None else \
            (*prompts, [0] * len(prompts[1])) if len(prompts) == 2 else prompts
        new_slots = np.asarray(new_slots, dtype=np.int64).reshape(-1)
        if len(new_slots):
            if not self.can_mix:
                raise ValueError("this engine cannot run prompts inside a decode step")
            if len(new_slots) > self.mix_prompts or sum(len(p) - c for p, c in zip(new_ids, cached)) > self.mix_tokens:
                raise ValueError("more prompts than a step may carry")
            if set(new_slots.tolist()) & set(slots.tolist()):
                raise ValueError("prompt slots must be empty slots, not among the decode rows")
        if chain is not None:
            if not self.can_chain:
                raise ValueError("this engine cannot chain steps")
            if tokens is not None:
                raise ValueError("a chained step takes its tokens from `chain`, not `tokens`")
            missing = set(slots.tolist()) - set(chain.slots.tolist())
            if missing:
                raise ValueError(f"chained rows whose slots the previous step did not write: {sorted(missing)}")
            last = dict(zip(chain.slots.tolist(), chain.ids.tolist()))  # on the device: no wait
            tokens = np.array([last[s] for s in slots.tolist()], dtype=np.int64)
        elif len(slots) and tokens is None:
            raise ValueError("decode_greedy_begin needs tokens or chain")
        self.calls.append(("greedy", len(slots), len(new_slots), chain is not None))
        self._sleep()
        rows = self._decode_rows(slots, tokens) if len(slots) else []
        rows += [self._fill(int(s), list(np.asarray(p).reshape(-1)), int(c))
                 for s, p, c in zip(new_slots, new_ids, cached)]
        logits = np.stack(rows) if rows else np.zeros((0, self.vocab_size), np.float32)
        if ban is not None:
            logits[np.ix_(ban.rows, ban.ids)] = -np.inf
        ids = logits.argmax(axis=-1).astype(np.int64)
        if draws is not None:
            if not self.can_sample:
                raise ValueError("this engine cannot draw tokens")
            rows = logits[draws.rows]
            if draws.penalties is not None:
                every = np.concatenate([slots, new_slots])
                for i, (r, pen) in enumerate(zip(draws.rows, draws.penalties.T)):
                    if tuple(pen) != (1.0, 0.0, 0.0):  # a penalised row's slot must be tracked
                        penalize(rows[i], *self.counts[int(every[r])], *pen)
            ids[draws.rows] = draw_tokens(rows, draws)
            self.drawn += len(draws.rows)
        step = FakeStep(ids, np.concatenate([slots, new_slots]))
        self.steps.append(step)
        return step

    def track(self, slot: int, prompt_ids) -> None:
        if not self.can_sample:
            raise ValueError("this engine keeps no token counts")
        seen = np.zeros(self.vocab_size, dtype=bool)
        seen[np.asarray(prompt_ids, dtype=np.int64) % self.vocab_size] = True
        self.counts[int(slot)] = (seen, np.zeros(self.vocab_size, dtype=np.int32))

    def release(self, slot: int) -> None:
        self.counts.pop(slot, None)
        self.lengths[slot] = 0
        self.state[slot] = 0  # its tokens stay: the KV a released slot keeps

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    @property
    def prefill_groups(self) -> list[int]:
        return [c[1] for c in self.calls if c[0] == "prefill"]


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class FakeTokenizer:
    """Id i <-> " t{i}"; `encode` of any text: its characters' codes modulo the vocabulary."""

    def __init__(self, vocab_size: int = 64):
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" t{int(i)}" for i in ids)

    def encode(self, text: str) -> _Encoding:
        return _Encoding([ord(c) % self.vocab_size for c in text])

    def get_vocab(self) -> dict:
        return {f"t{i}": i for i in range(self.vocab_size)}


def fake(**kw) -> tuple[FakeEngine, FakeTokenizer]:
    """The (engine, tokenizer) pair `run_jobs` takes."""
    ex = FakeEngine(**kw)
    return ex, FakeTokenizer(ex.vocab_size)


#: the engine's paths the scheduler tests run each request through
VARIANTS = {"plain": {}, "chain": {"can_chain": True}, "mix": {"can_mix": True},
            "chain+mix": {"can_chain": True, "can_mix": True},
            # prefix reuse (tests/test_prefix_reuse.py): slots taken by prefix, else least recently freed
            "reuse": {"can_reuse": True}}

PROMPTS = ["Once upon a time", "The cat", "A dog", "Tom", "Lily", "The sun", "Ben and Mia", "A big red ball",
           "Sue", "The little bird", "Max", "One day"]


def answer_text(tokens, reason="length") -> str:
    """The text of an answer (an end id that stopped it is not part of it)."""
    return FakeTokenizer().decode(tokens[:-1] if reason == "stop" else tokens)


def run_jobs(engine, jobs, sink_delay=0.0, cancel_after=None, stream_interval=0.0, stats=None, mix_prefill=True,
             first_senders=0, sample_on_device=True, **params):
    """Submit `jobs` ((prompt text, max_tokens, stream) each, and optionally a dict of this job's
    own sampling parameters) to a new Scheduler over `engine` ((engine, tokenizer)); `params` are
    every job's. Waits for every final response; returns ({job: outputs}, {job: text})."""
    from tritonchat.python_backend.batching.detokenize import TextTracker, delta
    from tritonchat.python_backend.batching.sampling import SamplingParams
    from tritonchat.python_backend.batching.scheduler import Scheduler
    from tritonchat.python_backend.batching.sequence import Sequence

    ex, tok = engine
    sched = Scheduler(ex, stream_interval=stream_interval, mix_prefill=mix_prefill, first_senders=first_senders,
                      sample_on_device=sample_on_device)
    results, done = {}, threading.Event()

    def make(i, prompt, n, stream, own=None):
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
        return Sequence(ids, SamplingParams(max_tokens=n, **{"end_ids": (2,), **params, **(own or {})}), TextTracker(tok), sink,
                        stream=stream, is_cancelled=lambda: flag["cancel"])

    for i, job in enumerate(jobs):
        sched.submit(make(i, *job))
    assert done.wait(60)
    sched.shutdown()
    if stats is not None:
        stats.append(sched.stats)
    texts = {i: "".join(delta(tok, o.release.window, o.release.read_offset, o.release.trim_chars)
                        for o in outs if o.release) for i, outs in results.items()}
    return results, texts

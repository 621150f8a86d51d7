"""Fault injection for the isolation and recovery tests: an engine wrapper that fails on purpose
for the requests whose prompt holds a marker token, so a test can send one bad request among
good ones through the real tritonserver and check that it fails alone.

Off unless the generator's environment sets TRITONCHAT_FAULTS, a comma list of KIND:TOKEN_ID:
  prefill_error   the engine raises in a prefill that holds a marked prompt
  nan_logits      a marked sequence's logits are NaN (prefill and decode)
  neginf_logits   a marked sequence's logits are all -inf (sampling cannot choose)
  step_error      the engine raises in a decode step that holds a marked sequence
  oom             the same, raising MemoryError (an out-of-memory in one step)
  step_delay_ms   every decode step takes this many more milliseconds (a tiny model made as slow as
                  a real one, so that a test can see what happens while requests are in flight)
The wrapper runs every step through the plain (unchained) engine API, so it is for tests only.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .engines.base import Engine, greedy_tokens

KINDS = ("prefill_error", "nan_logits", "neginf_logits", "step_error", "oom", "step_delay_ms")


def parse(spec: str) -> dict[str, int]:
    faults = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, token = part.partition(":")
        if kind not in KINDS or not token.strip().lstrip("-").isdigit():
            raise ValueError(f"TRITONCHAT_FAULTS: {part!r} is not KIND:TOKEN_ID with KIND in {', '.join(KINDS)}")
        faults[kind] = int(token)
    return faults


def wrap_from_env(engine: Engine) -> Engine:
    spec = os.environ.get("TRITONCHAT_FAULTS", "")
    return FaultyEngine(engine, parse(spec)) if spec.strip() else engine


class FaultyEngine(Engine):
    def __init__(self, inner: Engine, faults: dict[str, int]):
        self.inner = inner
        self.faults = faults
        self.max_slots, self.max_seq_len, self.vocab_size = inner.max_slots, inner.max_seq_len, inner.vocab_size
        self.marked: dict[str, set[int]] = {k: set() for k in faults if k != "step_delay_ms"}  # kind -> slots

    def _mark(self, slots, prompts) -> set[str]:
        hit = set()
        for slot, ids in zip(slots, prompts):
            for kind, token in self.faults.items():
                if kind == "step_delay_ms":
                    continue
                if token in np.asarray(ids).tolist():
                    self.marked[kind].add(int(slot))
                    hit.add(kind)
                else:
                    self.marked[kind].discard(int(slot))
        return hit

    def _poison(self, slots, logits: np.ndarray) -> np.ndarray:
        for kind, value in (("nan_logits", np.nan), ("neginf_logits", -np.inf)):
            rows = [i for i, s in enumerate(slots) if int(s) in self.marked.get(kind, ())]
            if rows:
                logits[rows] = value
        return logits

    def prefill(self, slot, token_ids):
        return self.prefill_batch([slot], [token_ids])[0]

    def prefill_batch(self, slots, prompts):
        if "prefill_error" in self._mark(slots, prompts):
            raise RuntimeError("injected prefill failure")
        return self._poison(slots, np.array(self.inner.prefill_batch(slots, prompts), copy=True))

    def decode(self, slots, tokens):
        if self.faults.get("step_delay_ms"):
            time.sleep(self.faults["step_delay_ms"] / 1e3)
        for kind, exc in (("step_error", RuntimeError("injected engine failure")),
                          ("oom", MemoryError("injected out-of-memory"))):
            if any(int(s) in self.marked.get(kind, ()) for s in slots):
                raise exc
        return self._poison(slots, np.array(self.inner.decode(slots, tokens), copy=True))

    def decode_greedy(self, slots, tokens, ban=None):
        return greedy_tokens(self.decode(slots, tokens), ban)

    def release(self, slot):
        for marked in self.marked.values():
            marked.discard(int(slot))
        self.inner.release(slot)

    def length(self, slot):
        return self.inner.length(slot)

    def warmup(self):
        self.inner.warmup()

    def describe(self):
        return {**self.inner.describe(), "injected_faults": self.faults}

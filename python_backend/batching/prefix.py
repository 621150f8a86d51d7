"""Prefix reuse: which tokens' KV each slot holds, and which free slot a new prompt goes into.

Multi-turn chat sends the whole conversation again every turn, and many requests start with the
same system prompt. An engine that can (`Engine.can_reuse_prefix`) keeps a released slot's KV until
the next prefill into it and prefills a prompt on top of a prefix whose KV a slot holds
(`prefill_cached`); `copy_prefix` copies such a prefix from another slot. `PrefixCache` remembers,
for every slot, the token ids whose KV it holds, and places each new prompt:
  - into the free slot holding the longest prefix of it (the least recently freed among ties), so a
    conversation's next turn lands where its previous turn left its KV;
  - where no free slot holds a useful prefix (`USEFUL` tokens), into the least recently freed one,
    so the slots of recent conversations, likely to come back, are taken last;
  - and where another slot (a running sequence's, or a free one) holds a longer prefix than the
    chosen slot by `USEFUL` tokens or more (a system prompt a running request shares), its KV is
    copied over first: a copy costs a small part of what computing the tokens again does.

Exactness: only KV computed by prefills is offered (a sequence's prompt, never its answer). The
answer's KV was written by decode steps, one token a row, and its rounding differs from a prefill's
of the same tokens; a prefill on top of a prefill's KV is bitwise a full prefill's on the ONNX
Runtime engine (2 new tokens or more: `Engine.reuse_min_new`), so a greedy answer does not change
with reuse (measured: docs/benchmarks.md, "Prefix reuse"). The next turn's prompt holds the
previous answer, computed then by a prefill: from the turn after, that KV is reused too.
"""

from __future__ import annotations

import numpy as np

#: prefix tokens that make a slot worth choosing (or a copy worth making): a shorter match (BOS, a
#: chat template's first marker) is shared by every prompt and says nothing about a conversation
USEFUL = 8


def common_prefix(a: np.ndarray | None, b: np.ndarray, cap: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `cap`."""
    if a is None:
        return 0
    m = min(len(a), len(b), cap)
    if m <= 0:
        return 0
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


class PrefixCache:
    def __init__(self, min_new: int = 1):
        """`min_new`: prompt tokens a prefill must compute at least (the engine's `reuse_min_new`)."""
        self.min_new = max(1, int(min_new))
        self._held: dict[int, np.ndarray] = {}  # slot -> the token ids whose KV it holds, in order
        # the first USEFUL ids (as bytes) -> the slots holding a prefix that starts so: only those can
        # matter to a prompt, so placing one compares it with them alone (all 128 slots of a server
        # took ~0.45 ms a prompt; with random prompts now ~0.02)
        self._by_start: dict[bytes, set[int]] = {}

    @property
    def held(self) -> dict[int, np.ndarray]:
        """slot -> the token ids whose KV it holds (assign a whole new mapping; do not change it in place)."""
        return self._held

    @held.setter
    def held(self, value: dict) -> None:
        self._held, self._by_start = {}, {}
        for slot, ids in value.items():
            self._hold(slot, ids)

    def take(self, free_slots: list[int], prompt: np.ndarray) -> tuple[int, int, int | None]:
        """Remove the slot for `prompt` from `free_slots` (least recently freed first); return
        (slot, prompt tokens whose KV it will hold before the prefill, the slot to copy them from
        or None)."""
        prompt = np.asarray(prompt, dtype=np.int64)
        best, reused, source = self._choose(free_slots, prompt)
        slot = free_slots.pop(best)
        self._hold(slot, prompt[:reused])
        return slot, reused, source

    def prefilled(self, slot: int, prompt: np.ndarray) -> None:
        """`slot` now holds the KV of all of `prompt` (its prefill ran)."""
        self._hold(slot, prompt)

    def forget(self, slot: int) -> None:
        """`slot`'s KV cannot be trusted (its prefill or a step failed)."""
        old = self._held.pop(slot, None)
        if old is not None:
            self._unindex(slot, old)

    def _choose(self, free_slots: list[int], prompt: np.ndarray) -> tuple[int, int, int | None]:
        """(index in `free_slots` of the slot for `prompt`, tokens reused, the slot to copy from or None).
        Only slots whose prefix starts with the prompt's first USEFUL ids can hold USEFUL tokens of it
        or more; where none of the free ones does, the least recently freed is taken with what it holds."""
        cap = len(prompt) - self.min_new
        near = self._by_start.get(prompt[:USEFUL].tobytes(), ()) if cap >= USEFUL else ()
        found = {s: common_prefix(self._held[s], prompt, cap) for s in near}
        free = [(found[s], -i) for i, s in enumerate(free_slots) if s in found] if found else ()
        top = max(free) if free else (0, 0)  # the longest; the oldest among ties
        if top[0] >= USEFUL:
            best, reused = -top[1], top[0]
        else:
            best, reused = 0, common_prefix(self._held.get(free_slots[0]), prompt, cap)
        slot = free_slots[best]
        source, longest = None, reused + USEFUL - 1
        for other in self._held:  # in the order slots were first filled: one source among equals
            n = found.get(other, 0) if other != slot else 0
            if n > longest:
                source, longest = other, n
        return best, (longest if source is not None else reused), source

    def _hold(self, slot: int, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        old = self._held.get(slot)
        if old is not None:
            self._unindex(slot, old)
        self._held[slot] = ids
        if len(ids) >= USEFUL:
            self._by_start.setdefault(ids[:USEFUL].tobytes(), set()).add(slot)

    def _unindex(self, slot: int, ids: np.ndarray) -> None:
        if len(ids) >= USEFUL:
            key = ids[:USEFUL].tobytes()
            group = self._by_start[key]
            group.discard(slot)
            if not group:
                del self._by_start[key]

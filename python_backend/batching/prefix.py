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
        self.held: dict[int, np.ndarray] = {}  # slot -> the token ids whose KV it holds, in order

    def take(self, free_slots: list[int], prompt: np.ndarray) -> tuple[int, int, int | None]:
        """Remove the slot for `prompt` from `free_slots` (least recently freed first); return
        (slot, prompt tokens whose KV it will hold before the prefill, the slot to copy them from
        or None)."""
        prompt = np.asarray(prompt)
        cap = len(prompt) - self.min_new
        found = [common_prefix(self.held.get(s), prompt, cap) for s in free_slots]
        best = max(range(len(found)), key=lambda i: (found[i], -i))  # the longest; the oldest among ties
        if found[best] < USEFUL:
            best = 0
        slot, reused = free_slots.pop(best), found[best]
        source, longest = None, reused + USEFUL - 1
        for other, ids in self.held.items():
            n = common_prefix(ids, prompt, cap) if other != slot else 0
            if n > longest:
                source, longest = other, n
        if source is not None:
            reused = longest
        self.held[slot] = prompt[:reused]
        return slot, reused, source

    def prefilled(self, slot: int, prompt: np.ndarray) -> None:
        """`slot` now holds the KV of all of `prompt` (its prefill ran)."""
        self.held[slot] = np.asarray(prompt)

    def forget(self, slot: int) -> None:
        """`slot`'s KV cannot be trusted (its prefill or a step failed)."""
        self.held.pop(slot, None)

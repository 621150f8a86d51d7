"""What the host writes for the device: a step's input rows, a prefill's packed layout, and the
buckets that key the CUDA graphs.

A decode step's inputs are int64 rows, one column per row of the batch (`Layout.step_inputs`):
tokens, slots, positions, "take the token from the previous step" flags, then BAN_IDS rows of
banned ids (-1: none). Padding columns are token 0 at position 0 of the dummy slot (the KV cache's
extra last slot), so a padded batch writes nowhere else.

A prefill's inputs are one int64 vector (`Layout.build`): the packed tokens, the slot and position
of each, then what its attention needs. Its key says its shape: `(tokens,)` for the varlen (Triton)
attention, `(tokens, prompts, width)` for prompts right-padded for SDPA. A CUDA graph is captured
per key, so `Layout.buckets` pads a prefill to a few keys; `Layout.exact_key` is the key of an
unpadded (eager) prefill. `Layout.split` cuts the vector, on the device, into the `Prompts` the
forward reads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .kernels import cdiv, next_pow2

BAN_IDS = 8  # end ids a decode step can ban per row inside its graph (more: banned outside it)
IN_ROWS = 4 + BAN_IDS  # rows of a decode step's inputs
PREFILL_TOKEN_STEP = 256  # prefill graph buckets: tokens in multiples of this above it
PREFILL_BLOCK = 64  # queries per program of the varlen prefill attention
MIX_PROMPTS = 8  # prompts a decode step can carry (`decode_greedy_begin(prompts=...)`)


class Prompts(NamedTuple):
    """A step's prompts on the device, cut from their layout: packed tokens, the slot and position
    of each token, the last row of each prompt, and what their attention reads: varlen (key
    (tokens,)): `table` of query blocks and their number `blocks`; padded (key (tokens, prompts,
    width)): `pack` = (slot of each prompt, packed row of each cell [prompts, width], cell of each
    packed row, width)."""

    tok: torch.Tensor
    slot_of: torch.Tensor
    pos: torch.Tensor
    last: torch.Tensor
    table: torch.Tensor | None = None
    blocks: int = 0
    pack: tuple | None = None


class Layout:
    """Input layouts of the engine's steps and prefills, and the buckets that key its graphs.

    `varlen`: the Triton attention (prompts packed, varlen; decode attention in place, no length
    bucket), else SDPA (prompts right-padded; decode attention over a length bucket of
    `length_bucket` positions)."""

    def __init__(self, varlen: bool, max_slots: int, max_seq_len: int, length_bucket: int):
        self.varlen = varlen
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.length_bucket = length_bucket
        self.dummy_slot = max_slots  # the KV cache's extra last slot: padding writes there

    # -- decode steps ------------------------------------------------------------------------
    def step_inputs(self, a: np.ndarray, n: int, slots, tokens, pos, chained: bool, ban, cols=None,
                    pslots=()) -> None:
        """Write a step's input rows into `a` [IN_ROWS, >= n]; columns past n are padding rows
        (token 0 at position 0 of the dummy slot, nothing banned). A step carrying prompts has its
        decode rows in columns [0, cols) and the prompts' from `cols` (their slots; padding: the
        dummy slot); ban rows past n are prompts."""
        a[0, :n] = 0 if tokens is None else tokens
        a[1, :n], a[2, :n], a[3, :n] = slots, pos, int(chained)
        a[0, n:], a[1, n:], a[2, n:], a[3, n:] = 0, self.dummy_slot, 0, 0
        if cols is not None:
            a[1, cols:cols + len(pslots)] = pslots
        a[4:] = -1
        if ban is not None:
            ids = np.asarray(ban.ids, dtype=np.int64).reshape(-1)
            a[4:4 + len(ids), self.row_cols(ban.rows, n, cols)] = ids[:, None]

    @staticmethod
    def row_cols(rows, n: int, cols) -> np.ndarray:
        """The input columns of a step's `rows` (a ban's, a draw's: rows past n are prompts, whose
        columns start at `cols`)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows if cols is None else np.where(rows < n, rows, rows - n + cols)

    def safe_step_inputs(self, inp: torch.Tensor) -> torch.Tensor:
        """Fill step input rows so that every row is token 0 at position 0 of the dummy slot,
        nothing banned: warm-up and capture touch the dummy slot only."""
        inp.zero_()
        inp[1].fill_(self.dummy_slot)
        inp[4:].fill_(-1)
        return inp

    def length_bucket_of(self, top: int) -> int | None:
        """Positions the SDPA decode attention gathers for a longest sequence of `top` (None: the
        Triton attention, which reads each slot's own length)."""
        if self.varlen:
            return None
        return min(self.max_seq_len, cdiv(top, self.length_bucket) * self.length_bucket)

    # -- prefill keys --------------------------------------------------------------------------
    def buckets(self, lens: np.ndarray) -> tuple:
        """A prefill graph's key. Tokens are padded to a power of two (>= 64) up to
        PREFILL_TOKEN_STEP and to a multiple of it above (a prefill is compute-bound there;
        figures: docs/benchmarks-gpu.md, "Figures behind settings in the code"). With the Triton
        attention the key is (tokens,): prompts of any number and length share it, so warm-up captures every
        bucket. With SDPA (right-padded prompts): (tokens, prompts, width), prompts and width
        (>= 16) padded to powers of two, captured on first use."""
        n = int(lens.sum())
        step = PREFILL_TOKEN_STEP
        t = max(64, next_pow2(n)) if n <= step else cdiv(n, step) * step
        if self.varlen:
            return (t,)
        b = next_pow2(len(lens))
        w = min(self.max_seq_len, max(16, next_pow2(int(lens.max()))))
        return t, b, w

    def exact_key(self, lens: np.ndarray) -> tuple:
        """The key of a prefill run eagerly on exactly its prompts: (tokens,) varlen, else (tokens,
        prompts, longest prompt)."""
        n = int(lens.sum())
        return (n,) if self.varlen else (n, len(lens), int(lens.max()))

    def token_buckets(self, limit: int):
        """Every prefill bucket (Triton attention: the token count) of 1 to `limit` tokens."""
        n = 1
        while n <= limit:
            key = self.buckets(np.array([n]))
            yield key
            n = key[0] + 1  # the next bucket's first token count

    def warmup_keys(self, limit: int):
        """The prefill graph keys warm-up captures: every token bucket up to `limit` tokens with the
        Triton attention, one prompt of every width bucket with SDPA."""
        if self.varlen:
            yield from self.token_buckets(limit)
            return
        w = 16
        while w <= min(self.max_seq_len - 1, limit):
            yield self.buckets(np.array([w]))
            w *= 2

    # -- prefill layouts -----------------------------------------------------------------------
    def varlen_dims(self, t: int, mixed: bool = False) -> tuple[int, int]:
        """(prompts, query blocks) a varlen prefill of `t` tokens has room for: at most one prompt
        per token and per slot (MIX_PROMPTS in a decode step); each prompt's blocks of PREFILL_BLOCK
        queries."""
        pb = min(t, self.max_slots, MIX_PROMPTS if mixed else t)
        return pb, cdiv(t, PREFILL_BLOCK) + pb

    def mix_cols(self, key) -> int:
        """Prompt columns of a decode step carrying prompts of bucket `key`."""
        return self.varlen_dims(key[0], True)[0] if len(key) == 1 else key[1]

    def size(self, t: int, mixed: bool = False) -> int:
        """Length of a varlen prefill layout of bucket (t,) (see `build`)."""
        pb, nb = self.varlen_dims(t, mixed)
        return 3 * t + pb + 4 * nb

    def build(self, slots, ids, lens, key, mixed: bool = False, first=None) -> np.ndarray:
        """A prefill's int64 inputs for `key`, in one vector: tokens, slot of each token, positions
        [t each]; then for (tokens t,) (varlen): last row of each prompt [prompts], one
        (first row, slot, first position, queries) row per query block [blocks x 4]; for (tokens t,
        prompts b, width w) (padded): cell -> packed row [b * w]; packed row -> cell [t]; last row
        of each prompt, slots [b each]. Where `key` is larger than the prompts (a graph's bucket),
        padding tokens write their K/V into the dummy slot; padding prompts (padded layout) read
        it, padding query blocks (varlen) do nothing. `first` (varlen only): the position of each
        prompt's first token, where its slot already holds the KV of the positions before it (a
        prefix reused: `TorchEngine.prefill_cached`); the attention reads those from the cache."""
        t = key[0]
        n, k = int(lens.sum()), len(slots)
        first = np.zeros(k, np.int64) if first is None else np.asarray(first, np.int64)
        if len(key) != 1 and first.any():
            raise ValueError("a prompt on top of cached KV needs the varlen layout")
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        tok = np.zeros(t, np.int64)
        tok[:n] = np.concatenate(ids)
        slot_of = np.full(t, self.dummy_slot, np.int64)
        slot_of[:n] = np.repeat(slots, lens)
        pos = np.zeros(t, np.int64)
        pos[:n] = np.concatenate([f + np.arange(m) for f, m in zip(first, lens)])
        if len(key) == 1:
            pb, nb = self.varlen_dims(t, mixed)
            last = np.zeros(pb, np.int64)
            last[:k] = starts + lens - 1
            table = np.zeros((nb, 4), np.int64)
            table[:, 1] = self.dummy_slot
            q0 = [np.arange(0, m, PREFILL_BLOCK) for m in lens]
            blocks = np.concatenate(q0)
            owner = np.repeat(np.arange(k), [len(x) for x in q0])
            nbk = len(blocks)
            table[:nbk, 0] = starts[owner] + blocks
            table[:nbk, 1] = np.asarray(slots, np.int64)[owner]
            table[:nbk, 2] = first[owner] + blocks
            table[:nbk, 3] = np.minimum(PREFILL_BLOCK, lens[owner] - blocks)
            return np.concatenate([tok, slot_of, pos, last, table.reshape(-1)])
        _, b, w = key
        grid = np.arange(w)[None, :]
        real = grid < lens[:, None]  # [k, w]
        rows = np.zeros((b, w), np.int64)
        rows[:k] = np.where(real, starts[:, None] + grid, 0)
        cells = np.zeros(t, np.int64)
        cells[:n] = (np.arange(k)[:, None] * w + grid)[real]
        last = np.zeros(b, np.int64)
        last[:k] = starts + lens - 1
        slot_t = np.full(b, self.dummy_slot, np.int64)
        slot_t[:k] = slots
        return np.concatenate([tok, slot_of, pos, rows.reshape(-1), cells, last, slot_t])

    def safe(self, key, mixed: bool = False) -> np.ndarray:
        """Inputs of `key` that touch nothing but the dummy slot: what a graph is captured with."""
        t = key[0]
        head = [np.zeros(t, np.int64), np.full(t, self.dummy_slot, np.int64), np.zeros(t, np.int64)]
        if len(key) == 1:
            pb, nb = self.varlen_dims(t, mixed)
            table = np.zeros((nb, 4), np.int64)
            table[:, 1] = self.dummy_slot
            return np.concatenate(head + [np.zeros(pb, np.int64), table.reshape(-1)])
        _, b, w = key
        return np.concatenate(head + [np.zeros(b * w + t + b, np.int64), np.full(b, self.dummy_slot, np.int64)])

    def split(self, buf: torch.Tensor, key, mixed: bool = False) -> Prompts:
        """The prompts whose inputs are `buf` (see `build`), as views of it."""
        t = key[0]
        if len(key) == 1:
            pb, nb = self.varlen_dims(t, mixed)
            tok, slot_of, pos, last, table = torch.split(buf, [t, t, t, pb, 4 * nb])
            return Prompts(tok, slot_of, pos, last, table=table, blocks=nb)
        _, b, w = key
        tok, slot_of, pos, rows, cells, last, slot_t = torch.split(buf, [t, t, t, b * w, t, b, b])
        return Prompts(tok, slot_of, pos, last, pack=(slot_t, rows.view(b, w), cells, w))

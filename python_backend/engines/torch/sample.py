"""Sampled tokens drawn on the device, from the logits a decode step left there: the torch form of
`engines.base.draw_tokens` (the host's definition, which this follows step by step), so that a step
with sampled rows needs no logits on the host and can chain and carry prompts like a greedy one.

Each row's randomness is the one uniform number its request's generator gave for this token
(`Draws.u`, drawn on the host in the request's own order): the same seed gives the same answer
whichever batch the request shares, and wherever its tokens are drawn (host or device): the tokens'
weights are integers (`engines.base.weights`), whose sums are exact in any order.

Cost: where some row has a top_k or top_p, one sort of the drawn rows' logits (stable, so that ties
keep the lower id first, as the host's order does); then the Triton kernel of draw_kernel.py (CUDA
with the engine's Triton kernels), else a scan, a scatter and a dozen elementwise passes; after the
step's graph on the same stream: with CUDA graphs as one replay (`draw_packed`,
graphs.StepGraphs.run_draw), else op by op (`draw`); figures in docs/benchmarks-gpu.md (twenty-ninth
and thirtieth sessions).

Penalties (`engines.base.penalize`, the host's definition) read each sequence's token counts, which
live here on the device (`TokenCounts`), so that a chained step, whose input tokens the host has
not seen yet, counts them too: the prompt when the sequence is placed, then every token a decode
step feeds it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import NONFINITE, Draws, weight_shift


class TokenCounts:
    """Per slot (the dummy slot last): the ids of the prompt (`seen`) and how often each id was fed
    to the sequence by a decode step (`counts`: its output), for the slots `track`ed. Allocated at
    warm-up with CUDA graphs, else at the first `track` (int32 + bool per slot and id: 20 MB for 129
    slots of 32,000 ids)."""

    def __init__(self, slots: int, vocab: int, device: torch.device):
        self.slots, self.vocab, self.device = slots, vocab, device
        self.tracked = np.zeros(slots, dtype=bool)
        self.seen = self.counts = None
        self._staged: list = []  # GPU: [pinned buffer, event of the copy that last read it], taken in turn
        self._turn = 0

    def allocate(self) -> None:
        """The counts, now (the CUDA graphs that penalise read them where they are)."""
        if self.counts is None:
            self.counts = torch.zeros(self.slots, self.vocab, dtype=torch.int32, device=self.device)
            self.seen = torch.zeros(self.slots, self.vocab, dtype=torch.bool, device=self.device)
            self._one = torch.ones((), dtype=torch.int32, device=self.device)  # what each fed token adds

    def track(self, slot: int, prompt_ids) -> None:
        self.allocate()
        ids = self._to_device(np.asarray(prompt_ids, dtype=np.int64) % self.vocab)
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        self.seen[slot, ids] = True
        self.tracked[slot] = True

    def release(self, slot: int) -> None:
        self.tracked[slot] = False

    def count(self, slots: np.ndarray, tokens, last_ids: torch.Tensor) -> None:
        """Count the tokens a decode step feeds `slots` (host `tokens`, or None for a chained step:
        the slots' last ids on the device, read before the step writes the next ones)."""
        mine = self.tracked[slots]
        if not mine.any():
            return
        dev = self._to_device(slots[mine])
        tok = last_ids.index_select(0, dev) if tokens is None else \
            self._to_device(np.asarray(tokens, dtype=np.int64)[mine] % self.vocab)
        self.counts.index_put_((dev, tok), self._one, accumulate=True)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """`a` (int64) on the device, through pinned buffers taken in turn: a copy from pageable memory
        may wait for the stream (the driver stages it), i.e. for the step in flight that the next
        chained step is launched to overlap; without non_blocking every copy waits for it."""
        if self.device.type != "cuda":
            return torch.from_numpy(a)
        if not self._staged:
            self._staged = [[torch.empty(self.slots, dtype=torch.int64).pin_memory(), torch.cuda.Event()]
                            for _ in range(8)]
        entry = self._staged[self._turn]
        self._turn = (self._turn + 1) % len(self._staged)
        entry[1].synchronize()  # the copy that last read this buffer has run (at once, but for a burst)
        if len(entry[0]) < len(a):
            entry[0] = torch.empty(1 << (len(a) - 1).bit_length(), dtype=torch.int64).pin_memory()
        host = entry[0][:len(a)]
        host.numpy()[:] = a
        out = host.to(self.device, non_blocking=True)
        entry[1].record(torch.cuda.current_stream(self.device))
        return out

    def penalize(self, z: torch.Tensor, slots: torch.Tensor, repetition: torch.Tensor, presence: torch.Tensor,
                 frequency: torch.Tensor, kinds=(True, True, True)) -> torch.Tensor:
        """`engines.base.penalize` on the float32 logits `z` of the rows whose slots are `slots`: the
        `repetition` penalty (float32) divided in float32, `frequency` and `presence` (float64)
        subtracted in float64; `kinds`: which of the three some row has (a row without one is left
        as it is either way: divided by 1, 0 subtracted)."""
        c = self.counts.index_select(0, slots)
        out = c > 0
        if kinds[0]:
            r = repetition[:, None]
            seen = self.seen.index_select(0, slots) | out
            z = torch.where(seen & (r != 1), torch.where(z > 0, z / r, z * r), z)
        if kinds[2]:
            z = (z.double() - frequency[:, None] * c.double()).float()
        if kinds[1]:
            z = (z.double() - presence[:, None] * out.double()).float()
        return z


class DrawInputs:
    """The device tensors of one step's `Draws`: the logits rows they read (`cols`); the rows drawn
    (temperature > 0: `sampled`, their indices among those, None where every row is) with their
    parameters; where some row has penalties, every row's slot and penalties. Built once per step on
    the host and copied over in one transfer."""

    def __init__(self, draws: Draws, cols: np.ndarray, device: torch.device, slots: np.ndarray | None = None):
        n = len(cols)
        pen = draws.penalties
        drawn = np.flatnonzero(draws.temperature > 0)
        m = self.m = len(drawn)
        buf = np.zeros((6 if pen is None else 10, n), dtype=np.float64)
        buf[0], buf[1, :m] = cols, drawn
        for i, a in enumerate((draws.temperature, draws.top_k, draws.top_p, draws.u), start=2):
            buf[i, :m] = a[drawn]
        if pen is not None:  # each row's slot, then repetition, presence, frequency
            buf[6], buf[7:] = slots, pen
        t = torch.from_numpy(buf).to(device, non_blocking=device.type == "cuda")
        self.cols = t[0].long()
        self.sampled = None if m == n else t[1, :m].long()
        self.temperature, self.top_k, self.top_p, self.u = t[2, :m].float(), t[3, :m].long(), t[4, :m].float(), t[5, :m]
        self.penalized = pen is not None
        self.ordered = draws.ordered
        if self.penalized:  # kinds: some row has a repetition, presence, frequency penalty
            self.kinds = (bool((pen[0] != 1).any()), bool(pen[1].any()), bool(pen[2].any()))
            self.slots, self.repetition, self.presence, self.frequency = t[6].long(), t[7].float(), t[8], t[9]


def draw(logits: torch.Tensor, d: DrawInputs, counts: TokenCounts | None = None,
         kernel=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens chosen for rows `d.cols` of `logits` [b, vocab] (bans already applied; penalties
    applied here, from `counts`), int64 [len(cols)], twice: as the host takes them (NONFINITE where a
    row has nothing to choose from: every logit -inf, or a NaN; that request fails alone) and as the
    next chained step reads them (always a token id: a -1 there would index the embedding out of
    bounds). A row at temperature 0 takes the argmax of its penalised logits; only the others go
    through the sort, most of a draw's cost (docs/benchmarks.md, "Penalties on the device")."""
    z = logits.index_select(0, d.cols).float()
    if d.penalized:
        z = counts.penalize(z, d.slots, d.repetition, d.presence, d.frequency, d.kinds)
    if d.sampled is None:
        return _draw(z, d.temperature, d.top_k, d.top_p, d.u, kernel, d.ordered)
    best = z.argmax(dim=1)
    ok = torch.isfinite(z.gather(1, best[:, None])[:, 0])
    taken, fed = torch.where(ok, best, NONFINITE), best
    if d.m:
        t, f = _draw(z.index_select(0, d.sampled), d.temperature, d.top_k, d.top_p, d.u, kernel, d.ordered)
        taken, fed = taken.index_copy(0, d.sampled, t), fed.index_copy(0, d.sampled, f)
    return taken, fed


def _draw(z: torch.Tensor, temperature, top_k, top_p, u, kernel=None,
          ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` of rows at temperature > 0 (float32 logits `z`, penalised), as `draw` returns it; after
    the sort, `kernel` (draw_kernel.launch: one Triton launch) where given, else torch ops. `ordered`
    False: no row has a top_k or top_p (`Draws.ordered`), so nothing is sorted."""
    z = z / temperature[:, None]
    v = z.shape[1]
    sz, order = torch.sort(z, dim=1, descending=True, stable=True) if ordered else (None, None)
    if kernel is not None:
        return kernel(z, sz, order, top_k, top_p, u)
    if ordered:
        # top_k: every logit below the k-th largest weighs 0 (its ties stay in, as on the host)
        k = torch.where(top_k > 0, top_k, v).clamp(max=v)
        kth = sz.gather(1, (k - 1)[:, None])
        top = sz[:, :1]
        w = torch.where(sz >= kth, _weights(sz, top), 0)
        # top_p: in descending order, the tokens while the weight before them is under top_p times the total
        total = w.sum(dim=1, keepdim=True)
        mass = torch.where(top_p[:, None] >= 1.0, float("inf"), top_p[:, None].double() * total.double())
        w = torch.where((w.cumsum(dim=1) - w).double() < mass, w, 0)
        by_id = torch.zeros_like(w).scatter_(1, order, w)  # back in id order
    else:
        top = z.max(dim=1, keepdim=True).values  # a NaN anywhere: NaN (not finite), as on the host
        by_id = _weights(z, top)
    # in id order the host passes u along the cumulative weight (exact as float64: < 2**53)
    cdf = by_id.cumsum(dim=1)
    kept = cdf[:, -1]
    tokens = torch.searchsorted(cdf.double(), (u * kept.double())[:, None], right=True)[:, 0].clamp(max=v - 1)
    ok = torch.isfinite(top[:, 0]) & (kept > 0)
    return torch.where(ok, tokens, NONFINITE), torch.where(ok, tokens, 0)


def _weights(z: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """`engines.base.weights` of float32 logits `z` [R, V] below their rows' `top` [R, 1] (int64; 0 where
    the top is not finite)."""
    e = torch.nan_to_num(torch.exp(z.double() - top.double()))
    return (e * float(1 << weight_shift(z.shape[1]))).long()


#: the draw graphs' kinds: (penalties, ordered: some row has a top_k or top_p, so the rows are sorted)
DRAW_KINDS = ((False, False), (False, True), (True, False), (True, True))

#: rows of a step's packed draw inputs (`pack_draws`), int64: each drawn row's logits row and slot,
#: then (as float64 bits) temperature, top_k, top_p, u, repetition, presence, frequency
DRAW_IN = 9
_NEUTRAL = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # a padding row: greedy, nothing on


def pack_draws(a: np.ndarray, draws: Draws, cols: np.ndarray, slots: np.ndarray, pad_slot: int) -> None:
    """Write `draws` (rows of logits `cols`, of sequences in `slots`) into `a` [DRAW_IN, R] (int64,
    R >= len(cols)); the R - len(cols) rows after them are padding: logits row 0, `pad_slot` (the
    dummy slot), greedy, no penalty (`draw_packed` chooses a token for them that nobody reads)."""
    m = len(cols)
    a[0, :m], a[0, m:] = cols, 0
    a[1, :m], a[1, m:] = slots, pad_slot
    f = a[2:].view(np.float64)
    pen = draws.penalties if draws.penalties is not None else np.array([[1.0], [0.0], [0.0]])
    for i, v in enumerate((draws.temperature, draws.top_k, draws.top_p, draws.u, *pen)):
        f[i, :m], f[i, m:] = v, _NEUTRAL[i]


def draw_packed(z: torch.Tensor, inp: torch.Tensor, counts: TokenCounts | None, last_ids: torch.Tensor,
                kernel=None, ordered: bool = True):
    """`draw` without a branch on the rows' values, for a CUDA graph (engines/torch/graphs.py): the
    logits rows `z` [R, vocab] of the packed inputs `inp` [DRAW_IN, R] (`pack_draws`); penalties
    where `counts` is given. Every row goes through the draw and the argmax, and each keeps the one
    its temperature asks for; the slots' last ids get the chosen tokens. Returns (taken, fed), as
    `draw`."""
    p = inp[2:].view(torch.float64)
    slots, temperature = inp[1], p[0].float()
    z = z.float()
    if counts is not None:
        z = counts.penalize(z, slots, p[4].float(), p[5], p[6])
    best = z.argmax(dim=1)
    ok = torch.isfinite(z.gather(1, best[:, None])[:, 0])
    greedy = temperature == 0
    t, f = _draw(z, torch.where(greedy, 1.0, temperature), p[1].long(), p[2].float(), p[3], kernel, ordered)
    taken = torch.where(greedy, torch.where(ok, best, NONFINITE), t)
    fed = torch.where(greedy, best, f)
    last_ids.index_copy_(0, slots, fed)
    return taken, fed


def choose_drawn(logits: torch.Tensor, ids: torch.Tensor, draws: Draws, cols: np.ndarray, slots: np.ndarray,
                 dev_slots: torch.Tensor, counts: TokenCounts, last_ids: torch.Tensor, graphs=None,
                 kernel=None) -> None:
    """A decode step's `draws` (rows `cols` of its device `logits`, of sequences in `slots`; `dev_slots`:
    the slot of each of its columns, on the device): their tokens written into the step's `ids` and
    the slots' `last_ids`. With `graphs` (graphs.StepGraphs, CUDA graphs on) one replay of a draw
    graph; without, or where that graph could not be captured, `draw` op by op. `kernel`: the draw
    after its sort in one launch (draw_kernel.launch), where the engine runs Triton kernels."""
    kind = (draws.penalties is not None, draws.ordered)
    got = None if graphs is None else graphs.run_draw(logits, draws, cols, slots, kind,
                                                      packed_body(counts, last_ids, kernel))
    if got is None:
        d = DrawInputs(draws, cols, logits.device, slots)
        taken, fed = draw(logits, d, counts, kernel)
        last_ids.index_copy_(0, dev_slots.index_select(0, d.cols), fed)
        got = taken, d.cols
    ids.index_copy_(0, got[1], got[0])  # a graph's output buffer: the next replay rewrites it


def packed_body(counts: TokenCounts, last_ids: torch.Tensor, kernel=None):
    """The draw graphs' body (graphs.StepGraphs): `draw_packed` over these counts and last ids."""
    def body(z, inp, penalized: bool, ordered: bool):
        return draw_packed(z, inp, counts if penalized else None, last_ids, kernel, ordered)
    return body

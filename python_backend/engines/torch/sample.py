"""Sampled tokens drawn on the device, from the logits a decode step left there: the torch form of
`engines.base.draw_tokens` (the host's definition, which this follows step by step), so that a step
with sampled rows needs no logits on the host and can chain and carry prompts like a greedy one.

Each row's randomness is the one uniform number its request's generator gave for this token
(`Draws.u`, drawn on the host in the request's own order): the same seed gives the same answer
whichever batch the request shares, and wherever its tokens are drawn (host or device), up to the
rounding of the probabilities' sums.

Cost: one sort of the drawn rows' logits (stable, so that ties keep the lower id first, as the host's
stable order does) and a dozen elementwise passes, launched after the step's graph on the same
stream; figures in docs/benchmarks-gpu.md.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import NONFINITE, Draws


class DrawInputs:
    """The device tensors of one step's `Draws`: the logits rows they read, and each row's
    parameters. Built once per step on the host and copied over in one transfer."""

    def __init__(self, draws: Draws, cols: np.ndarray, device: torch.device):
        n = len(cols)
        buf = np.empty((5, n), dtype=np.float64)  # one copy: cols, temperature, top_k, top_p, u
        buf[0], buf[1], buf[2], buf[3], buf[4] = cols, draws.temperature, draws.top_k, draws.top_p, draws.u
        t = torch.from_numpy(buf).to(device, non_blocking=device.type == "cuda")
        self.cols = t[0].long()
        self.temperature = t[1].float()
        self.top_k = t[2].long()
        self.top_p = t[3].float()
        self.u = t[4]


def draw(logits: torch.Tensor, d: DrawInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens drawn for rows `d.cols` of `logits` [b, vocab] (bans already applied), int64
    [len(cols)], twice: as the host takes them (NONFINITE where a row has nothing to draw from: every
    logit -inf, or a NaN; that request fails alone) and as the next chained step reads them (always
    a token id: a -1 there would index the embedding out of bounds)."""
    z = logits.index_select(0, d.cols).float() / d.temperature[:, None]
    v = z.shape[1]
    sz, order = torch.sort(z, dim=1, descending=True, stable=True)
    # top_k: every logit below the k-th largest out (its ties stay in, as on the host)
    k = torch.where(d.top_k > 0, d.top_k, v).clamp(max=v)
    kth = sz.gather(1, (k - 1)[:, None])
    sz = torch.where(sz >= kth, sz, float("-inf"))
    probs = torch.softmax(sz, dim=1)
    # top_p: the smallest prefix in descending order whose mass reaches top_p (rows at 1: all)
    cum = probs.cumsum(dim=1)
    keep = (cum - probs < d.top_p[:, None]) | (d.top_p[:, None] >= 1.0)
    probs = torch.where(keep, probs, 0.0)
    # back in id order, where the host passes u along the cumulative sum
    by_id = torch.zeros_like(probs).scatter_(1, order, probs).double()
    cdf = by_id.cumsum(dim=1)
    total = cdf[:, -1]
    tokens = torch.searchsorted(cdf, (d.u * total)[:, None], right=True)[:, 0].clamp(0, v - 1)
    ok = torch.isfinite(total) & (total > 0)
    return torch.where(ok, tokens, NONFINITE), tokens

"""A sampled row's draw after its sort, in one Triton kernel (`engines.base.draw_tokens`' definition,
engines/torch/sample.py's `_draw` in torch ops): one program per row walks the row three times, in
blocks, each walk stopping where its answer is found —

  1. the sorted row's top-k prefix (the values >= the k-th largest): its total weight;
  2. the sorted row again, the weight before each token summed as it goes, to the first token out
     (below the k-th, or the weight before it at least top_p times the total): the tokens kept are the
     ones before it, and the last of them (its logit and id) says which tokens those are in id order;
  3. the row in id order, the weights of the kept tokens summed to the first that passes u times
     their total: the token.

Weights are integers (`engines.base.weights`: exp in float64, times 2**shift, truncated), so every
sum is exact whatever its order, and this kernel's blocks and trees add up to what numpy's lines do.
This takes the place of the op-by-op draw's softmax, two scans, scatter, search and a dozen
elementwise passes (each a launch, most of them over the whole [rows, vocab] in float64); the sort
stays torch's (stable: ties keep the lower id first).
"""

from __future__ import annotations

import warnings

import torch

from ..base import NONFINITE, weight_shift

#: ids a program reads at once (16 warps): 8 blocks walk a 32,000-id row
BLOCK = 4096
_KERNEL = None


def load_draw_kernel():
    """The kernel (`launch` below runs it), or None where Triton is unusable."""
    global _KERNEL, _weigh
    if _KERNEL is not None:
        return _KERNEL or None
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton: the torch ops draw
        _KERNEL = False
        return None

    @triton.jit
    def _weigh(s, top, SCALE: tl.constexpr):
        # engines.base.weights: exp(s - top) in float64 (libdevice's), times 2**shift, truncated
        return (tl.exp(s.to(tl.float64) - top) * SCALE).to(tl.int64)

    @triton.jit
    def draw_kernel(Z, SZ, ORDER, TOP_K, TOP_P, U, TAKEN, FED, V, SCALE: tl.constexpr, BLOCK: tl.constexpr,
                    NONE: tl.constexpr, ORDERED: tl.constexpr):
        # Z: the rows / temperature [R, V] float32, in id order; SZ, ORDER: the same sorted (descending,
        # stable) and each one's id; TOP_K int64 (0: off), TOP_P float32, U float64, one each a row.
        # ORDERED False: no row has a top_k or top_p (each keeps every token), nothing was sorted, and
        # SZ is Z itself: the walks below that follow the sorted row read the row in id order instead
        r = tl.program_id(0).to(tl.int64)
        z_row, s_row = Z + r * V, SZ + r * V
        lane = tl.arange(0, BLOCK)
        if ORDERED:
            k = tl.load(TOP_K + r)
            k = tl.where((k > 0) & (k < V), k, V)
            top = tl.load(s_row)  # the largest (a NaN sorts first: such a row is not finite)
            kth = tl.load(s_row + k - 1)
            finite = (top == top) & (tl.abs(top) < float("inf"))
        else:  # 0. the largest, by a walk (a NaN anywhere: not finite, as numpy's max says)
            top = tl.full((), float("-inf"), tl.float32)
            nans = tl.zeros((), tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + lane
                z = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
                top = tl.maximum(top, tl.max(z))
                nans += tl.sum((z != z).to(tl.int32))
            kth = tl.full((), float("-inf"), tl.float32)
            finite = (nans == 0) & (top > float("-inf")) & (top < float("inf"))
        top64 = top.to(tl.float64)
        # 1. the top-k's total weight (its values are a prefix of the sorted row)
        total = tl.zeros((), tl.int64)
        start = 0
        go = finite
        while go:
            offs = start + lane
            s = tl.load(s_row + offs, mask=offs < V, other=float("-inf"))
            inside = s >= kth
            total += tl.sum(tl.where(inside, _weigh(s, top64, SCALE), 0))
            start += BLOCK
            go = (start < V) & (tl.sum(tl.where(inside, 0, 1)) == 0)  # on while the whole block was in
        # 2. the tokens kept: the sorted prefix before the first out (top_p at 1: none out by weight)
        kept = total  # ORDERED False: every token
        if ORDERED:
            p = tl.load(TOP_P + r)
            mass = tl.where(p >= 1.0, float("inf"), p.to(tl.float64) * total.to(tl.float64))
            carry = tl.zeros((), tl.int64)
            end = V
            start = 0
            go = finite
            while go:
                offs = start + lane
                valid = offs < V
                s = tl.load(s_row + offs, mask=valid, other=float("-inf"))
                w = tl.where(s >= kth, _weigh(s, top64, SCALE), 0)
                cum = carry + tl.cumsum(w, 0)
                out = valid & ((s < kth) | ((cum - w).to(tl.float64) >= mass))
                first = tl.min(tl.where(out, offs, V))
                kept = carry + tl.sum(tl.where(offs < first, w, 0))
                carry += tl.sum(w)
                end = tl.minimum(end, first)
                start += BLOCK
                go = (first == V) & (start < V)
            last = tl.maximum(end - 1, 0)
            z_last = tl.load(s_row + last)  # the last token kept: its logit, and its id among its equals
            id_last = tl.load(ORDER + r * V + last)
        else:
            z_last = tl.full((), float("-inf"), tl.float32)
            id_last = V
        # 3. in id order, the first kept token whose cumulative weight passes u times the kept total
        target = tl.load(U + r) * kept.to(tl.float64)
        carry = tl.zeros((), tl.int64)
        pick = V  # found before the end: u < 1, so u times the total rounds below it
        start = 0
        go = finite & (kept > 0)
        while go:
            offs = start + lane
            z = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
            w = tl.where((z > z_last) | ((z == z_last) & (offs <= id_last)), _weigh(z, top64, SCALE), 0)
            cum = carry + tl.cumsum(w, 0)
            pick = tl.minimum(pick, tl.min(tl.where(cum.to(tl.float64) > target, offs, V)))
            carry += tl.sum(w)
            start += BLOCK
            go = (pick == V) & (start < V)
        token = tl.minimum(pick, V - 1)
        ok = finite & (kept > 0)
        tl.store(TAKEN + r, tl.where(ok, token, NONE).to(tl.int64))
        tl.store(FED + r, tl.where(ok, token, 0).to(tl.int64))

    _KERNEL = draw_kernel
    return _KERNEL


def for_engine(triton_kernels: bool, device: torch.device | None = None, vocab: int = 8):
    """`launch` where an engine runs its Triton kernels (and Triton imports), else None (torch ops). On
    a GPU both forms compile now, on two rows of the engine's `vocab` (the vocabulary size and the
    scale it gives are what the compiled kernel is specialised for, so serving finds these compiled):
    one that will not compile (a Triton that cannot, seen with one form on Triton 3.6 before it was
    rewritten) leaves the draw to the torch ops, with a warning, instead of failing a serving step."""
    if not triton_kernels or load_draw_kernel() is None:
        return None
    if device is not None and device.type == "cuda":
        try:
            z = torch.zeros((2, vocab), device=device)
            args = (torch.zeros(2, dtype=torch.int64, device=device), torch.ones(2, device=device),
                    torch.zeros(2, dtype=torch.float64, device=device))
            launch(z, z, torch.zeros((2, vocab), dtype=torch.int64, device=device), *args)
            launch(z, None, None, *args)
        except Exception as exc:  # noqa: BLE001 - the torch ops draw the same tokens
            warnings.warn(f"TorchEngine: the draw kernel did not compile ({exc}); the torch ops draw")
            return None
    return launch


def launch(z: torch.Tensor, sz: torch.Tensor, order: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn tokens of rows `z` [R, V] (float32, divided by their temperatures; `sz`, `order`: the
    rows sorted, descending and stable, or None where no row has a top_k or top_p), as `sample._draw`
    returns them: (taken, NONFINITE where a row has nothing to draw from; fed, a real id always)."""
    rows, v = z.shape
    taken = torch.empty(rows, dtype=torch.int64, device=z.device)
    fed = torch.empty_like(taken)
    ordered = sz is not None  # None: no row has a top_k or top_p, and nothing was sorted
    load_draw_kernel()[(rows,)](z, sz if ordered else z, order if ordered else top_k, top_k, top_p, u, taken, fed,
                                v, SCALE=float(1 << weight_shift(v)), BLOCK=BLOCK, NONE=NONFINITE,
                                ORDERED=ordered, num_warps=16)
    return taken, fed

"""CUDA graphs of the torch engine's steps: capture on first use (or at warm-up) and replay.

Three kinds, each in its own table:
  * `decode`: a greedy decode step, keyed (padded batch size, SDPA length bucket or None). Batch
    sizes are 1, 2, 4, ... below `max_slots`, plus `max_slots` (or the engine's
    `graph_batch_sizes`); padded rows point at the dummy slot with position 0.
  * `mixed`: a decode step that also prefills prompts, keyed (padded batch, None, prompt token
    bucket); Triton attention only.
  * `prefill`: a prefill padded to a bucket (`Layout.buckets`), keyed by it; None where the capture
    failed (that bucket then runs the same padded forward eagerly).
  * `draws`: the tokens of a step's sampled and penalised rows chosen from its logits
    (`sample.draw_packed`), keyed (rows padded to a power of two, with penalties, sorted): one replay where
    the same ops launched one by one cost ~0.4 ms of host time a step (docs/benchmarks-gpu.md).
A graph reads static device inputs: decode and mixed steps write theirs into one of two pinned
staging buffers (taken in turn: with a step in flight, the copy out of the previous one may not
have run yet when the next step's inputs are written) and copy them in one go; a prefill graph
owns its input vector. This module knows the inputs' layout (`layout.py`), not the model: the
engine hands it the step bodies as callables (with each call: this object holds no reference to
the engine, so dropping the engine frees its memory at once).
"""

from __future__ import annotations

import collections
import time
import warnings

import numpy as np
import torch

from .layout import IN_ROWS, MIX_PROMPTS, Layout
from .sample import DRAW_IN, DRAW_KINDS, pack_draws

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def batch_sizes(requested, max_slots: int) -> list[int]:
    """The padded batch sizes decode graphs are captured for: `requested`, or the defaults below
    `max_slots` plus `max_slots` itself."""
    return sorted({int(s) for s in (requested or [s for s in DEFAULT_BATCH_SIZES if s < max_slots] + [max_slots])
                   if int(s) > 0})


def record(fn, pool, device):
    """`fn()` run twice on a side stream (Triton compiles, cuBLAS settles its workspaces), then
    captured into a CUDA graph in `pool`; returns (graph, what `fn` returned). Not through
    `torch.cuda.graph(...)`: its `__enter__` empties the device and pinned-host allocator
    caches before every capture, so each capture made while the server runs (a prefill bucket
    seen for the first time) was followed by synchronising cudaMalloc / cudaHostAlloc calls."""
    cur = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(cur)
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=pool)
        try:
            out = fn()
        finally:
            graph.capture_end()
    cur.wait_stream(stream)
    return graph, out


class StepGraphs:
    """The engine's CUDA graphs (see the module docstring) and their static inputs.

    The bodies the graphs capture come with each call: `step_body(inp, tb, mix)` -> (logits, ids),
    a decode step from its input rows (`mix`: (prompt layout, key) of the prompts it carries);
    `prefill_body(buf, key)` -> logits, a prefill from its layout. `last_ids`: device state a step
    body writes that a capture must leave as it found it. `buffers`: allocate the static inputs and
    the pinned staging buffers (CUDA graphs on); `mix_tokens`: prompt tokens a step can carry (0:
    none)."""

    def __init__(self, device: torch.device, layout: Layout, sizes: list[int], *, last_ids: torch.Tensor,
                 mix_tokens: int, buffers: bool):
        self.device = device
        self.layout = layout
        self.batch_sizes = sizes
        self._last_ids = last_ids
        self.decode: dict = {}  # (batch, length bucket) -> (graph, (logits, ids))
        self.mixed: dict = {}  # (batch, length bucket, prompt key) -> (graph, (logits, ids))
        self.prefill: dict = {}  # prefill key -> (graph, input, logits), or None: it runs eagerly
        self.draws: dict = {}  # (rows, (penalties, ordered)) -> (graph, (taken, fed)), or None: drawn eagerly
        self.draw_runs: collections.Counter = collections.Counter()  # replays of each
        self._pool = None  # decode and mixed graphs share one memory pool
        self._prefill_pool = None
        # graphs captured so far and the time it took (a capture on first use stalls every stream)
        self.captures = {"decode": 0, "decode_s": 0.0, "prefill": 0, "prefill_s": 0.0, "mixed": 0, "mixed_s": 0.0,
                         "draw": 0, "draw_s": 0.0}
        if not buffers:
            return
        top = sizes[-1] + MIX_PROMPTS
        self._in = torch.zeros((IN_ROWS, sizes[-1]), dtype=torch.int64, device=device)
        # two pinned staging buffers, used in turn: with a step in flight, the copy of the
        # previous one may not have run yet when the next step's inputs are written
        self._in_host = [torch.zeros((IN_ROWS, sizes[-1]), dtype=torch.int64).pin_memory() for _ in range(2)]
        self._turn = 0
        # the same for steps that carry prompts: step rows, then the prompts' layout, flat
        m = (IN_ROWS * top + layout.size(layout.buckets(np.array([mix_tokens]))[0], mixed=True)
             if mix_tokens > 0 else 1)
        self._mix_in = torch.zeros(m, dtype=torch.int64, device=device)
        self._mix_host = [torch.zeros(m, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._mix_turn = 0
        # a step's drawn rows: packed inputs (sample.pack_draws), staged in turn as the steps' are,
        # and the rows of logits they read (allocated with the first draw: the logits' type)
        self.draw_sizes = sorted({1 << i for i in range(top.bit_length()) if 1 << i < top} | {top})
        self._draw_in = torch.zeros((DRAW_IN, top), dtype=torch.int64, device=device)
        self._draw_host = [torch.zeros((DRAW_IN, top), dtype=torch.int64).pin_memory() for _ in range(2)]
        self._draw_turn = 0
        self._draw_z = None

    def batch_size(self, n: int) -> int | None:
        """The padded batch of `n` rows (None: larger than every graph; it runs eagerly)."""
        for s in self.batch_sizes:
            if s >= n:
                return s
        return None

    # -- replay --------------------------------------------------------------------------------
    def run_decode(self, b: int, tb, step_body, write_inputs):
        """Replay the decode step of padded batch `b` (captured on first use) on the input rows
        `write_inputs(a)` writes into `a` [IN_ROWS, largest batch] (numpy, pinned); returns the
        device (logits, ids, slot of each row)."""
        if (b, tb) not in self.decode:
            self.capture_decode(b, tb, step_body)
        host = self._in_host[self._turn]
        self._turn ^= 1
        write_inputs(host.numpy())
        self._in.copy_(host, non_blocking=True)
        graph, (logits, ids) = self.decode[(b, tb)]
        graph.replay()
        return logits, ids, self._in[1, :b]

    def run_mixed(self, b: int, tb, key, step_body, write_inputs, layout: np.ndarray):
        """Replay the decode step of padded batch `b` carrying prompts of bucket `key` (captured on
        first use): its rows as `write_inputs(a)` writes them into `a` [IN_ROWS, b + prompt
        columns], then the prompts' `layout`; returns the device (logits, ids, slot of each column)."""
        gkey = (b, tb, key)
        if gkey not in self.mixed:
            self.capture_mixed(b, tb, key, step_body)
        cols = b + self.layout.mix_cols(key)
        host = self._mix_host[self._mix_turn]
        self._mix_turn ^= 1
        flat = host.numpy()
        write_inputs(flat[:IN_ROWS * cols].reshape(IN_ROWS, cols))
        m = IN_ROWS * cols + len(layout)
        flat[IN_ROWS * cols:m] = layout
        self._mix_in[:m].copy_(host[:m], non_blocking=True)
        graph, (logits, ids) = self.mixed[gkey]
        graph.replay()
        return logits, ids, self._mix_in[cols:2 * cols]

    def run_draw(self, logits: torch.Tensor, draws, cols: np.ndarray, slots: np.ndarray, kind: tuple, draw_body):
        """Choose the tokens of `draws` (rows `cols` of the step's device `logits`, of sequences in
        `slots`) with the draw graph of their padded row count and `kind` (penalties, ordered: some row
        has a top_k or top_p) (captured at warm-up, else on first use): `draw_body(z, inputs, *kind)` is
        `sample.draw_packed` over the engine's state. Returns
        the device (tokens as the host takes them, their columns of `logits`), or None where that
        graph could not be captured (the engine then draws eagerly)."""
        m = len(cols)
        r = next(s for s in self.draw_sizes if s >= m)
        if self.draws.get((r, kind), True) is None:
            return None
        host = self._draw_host[self._draw_turn]
        self._draw_turn ^= 1
        pack_draws(host.numpy()[:, :r], draws, cols, slots, self._last_ids.shape[0] - 1)
        self._draw_in.copy_(host, non_blocking=True)
        if self._draw_z is None:
            self._draw_z = torch.empty((self._draw_in.shape[1], logits.shape[1]), dtype=logits.dtype,
                                       device=self.device)
        inp = self._draw_in[:, :r]
        torch.index_select(logits, 0, inp[0], out=self._draw_z[:r])
        if (r, kind) not in self.draws:
            self.capture_draw(r, kind, draw_body)
            if self.draws[(r, kind)] is None:
                return None
        graph, (taken, _) = self.draws[(r, kind)]
        graph.replay()
        self.draw_runs[(r, kind)] += 1
        return taken[:m], inp[0, :m]

    def run_prefill(self, key, prefill_body, layout: torch.Tensor) -> torch.Tensor:
        """Logits of the prefill whose inputs (of bucket `key`) are `layout`, as the bucket's graph
        (captured on first use) or, where it could not be captured, eagerly."""
        if key not in self.prefill:
            self.capture_prefill(key, prefill_body)
        entry = self.prefill[key]
        if entry is None:  # this bucket could not be captured: the same padded forward, eagerly
            return prefill_body(layout.to(self.device), key)
        graph, buf, out = entry
        buf.copy_(layout.pin_memory(), non_blocking=True)
        graph.replay()
        return out

    # -- capture -------------------------------------------------------------------------------
    def capture_decode(self, b: int, tb, step_body):
        """Capture the decode step for padded batch `b` (and SDPA length bucket `tb`)."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        saved = self._last_ids.clone()  # a capture between two chained steps must not lose the ids
        inp = self.layout.safe_step_inputs(self._in[:, :b])
        self.decode[(b, tb)] = record(lambda: step_body(inp, tb), self._pool, self.device)
        self._last_ids.copy_(saved)
        self.captures["decode"] += 1
        self.captures["decode_s"] += time.perf_counter() - t0

    def capture_mixed(self, b: int, tb, key, step_body):
        """Capture the decode step of padded batch `b` carrying prompts of bucket `key` (varlen)."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        saved = self._last_ids.clone()
        cols = b + self.layout.mix_cols(key)
        layout = torch.from_numpy(self.layout.safe(key, mixed=True)).to(self.device)
        m = IN_ROWS * cols + len(layout)
        inp = self.layout.safe_step_inputs(self._mix_in[:IN_ROWS * cols].view(IN_ROWS, cols))
        self._mix_in[IN_ROWS * cols:m].copy_(layout)
        buf = self._mix_in[IN_ROWS * cols:m]
        self.mixed[(b, tb, key)] = record(lambda: step_body(inp, tb, (buf, key)), self._pool, self.device)
        self._last_ids.copy_(saved)
        self.captures["mixed"] += 1
        self.captures["mixed_s"] += time.perf_counter() - t0

    def capture_draw(self, r: int, kind: tuple, draw_body):
        """Capture the draw of `r` packed rows of `kind` (penalties, ordered) on the inputs staged now."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        saved = self._last_ids.clone()
        z, inp = self._draw_z[:r], self._draw_in[:, :r]
        try:
            self.draws[(r, kind)] = record(lambda: draw_body(z, inp, *kind), self._pool, self.device)
        except Exception as exc:  # noqa: BLE001 - e.g. a sort that will not be captured: drawn eagerly
            warnings.warn(f"TorchEngine: draw graph of {r} rows not captured ({exc}); those steps draw eagerly")
            torch.cuda.synchronize(self.device)
            self.draws[(r, kind)] = None
        self._last_ids.copy_(saved)
        self.captures["draw"] += 1
        self.captures["draw_s"] += time.perf_counter() - t0

    def capture_draws(self, draw_body, vocab: int, dtype: torch.dtype) -> None:
        """Warm-up: capture the draw graphs of every row count and kind (with and without penalties, with
        and without a sort; on padding rows: logits row 0, slot 0, greedy), so that no capture stalls the
        steps while serving."""
        if self._draw_z is None:
            self._draw_z = torch.zeros((self._draw_in.shape[1], vocab), dtype=dtype, device=self.device)
        self._draw_in.zero_()
        for r in self.draw_sizes:
            for kind in DRAW_KINDS:
                if (r, kind) not in self.draws:
                    self.capture_draw(r, kind, draw_body)

    def capture_prefill(self, key, prefill_body) -> None:
        """Capture the prefill graph of bucket `key` into `prefill` (None: it runs eagerly)."""
        t0 = time.perf_counter()
        self.prefill[key] = self._prefill_entry(key, prefill_body)
        self.captures["prefill"] += 1
        self.captures["prefill_s"] += time.perf_counter() - t0

    def _prefill_entry(self, key, prefill_body):
        buf = torch.from_numpy(self.layout.safe(key)).to(self.device)
        try:
            if self._prefill_pool is None:
                self._prefill_pool = torch.cuda.graph_pool_handle()
            graph, out = record(lambda: prefill_body(buf, key), self._prefill_pool, self.device)
            return graph, buf, out
        except Exception as exc:  # noqa: BLE001 - a bucket that cannot be captured runs eagerly
            warnings.warn(f"TorchEngine: prefill graph {key} not captured ({exc}); that bucket runs eagerly")
            torch.cuda.synchronize(self.device)
            return None

    def capture_all(self, tbs, prefill_keys, mix_keys, step_body, prefill_body) -> None:
        """Warm-up: capture, where not yet captured, the decode step of every batch size (each length
        bucket or attention span of `tbs`), the prefill of every key of `prefill_keys` and, for every
        batch size, the step carrying prompts of every key of `mix_keys` (a list)."""
        for tb in tbs:
            for b in self.batch_sizes:
                if (b, tb) not in self.decode:
                    self.capture_decode(b, tb, step_body)
        for key in prefill_keys:
            if key not in self.prefill:
                self.capture_prefill(key, prefill_body)
        for b in self.batch_sizes:
            for key in mix_keys:
                if (b, None, key) not in self.mixed:
                    self.capture_mixed(b, None, key, step_body)

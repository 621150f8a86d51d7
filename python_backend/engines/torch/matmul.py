"""The torch engine's linear products over `QuantWeight`s and `DenseWeight`s (quant.py): `W8Matmul`.

How a product runs:
  * up to MAX_SKINNY_M rows (decode steps, small prefills): the Triton kernel `w8_matmul`
    (kernels.py), every row of the batch in one tile (one row: on the CUDA cores), its
    configuration tuned once per shape and row bucket when the engine loads (`W8Matmul.tune`,
    before any CUDA graph is captured; every candidate compiled first, in parallel: `precompile`);
  * more rows (prefills, decode steps carrying prompts), or no Triton (CPU): the weight widened to
    the engine's dtype (one `w8_widen` kernel where Triton runs), then the dense product (cuBLAS on
    the GPU): compute-bound there, and the same numbers as the kernel up to the order of the sums;
  * FP8 weights, more than `w8a8_rows` rows (`TorchEngine(w8a8_rows="auto")`, the default:
    `W8A8_ROWS` where the GPU has FP8 tensor cores with a scale per row, `w8a8_supported`; build
    setting `models.generator.w8a8`): W8A8 — each row of the activations rounded to E4M3 with a
    scale of its own (`quantize_rows_fp8`'s numbers: by the norm or SiLU·up kernel before the product,
    else the `fp8_rows` kernel), then `torch._scaled_mm` (the weight's scale per output channel).
    Above 64 rows the widening kernel's bf16 MMAs lose to bf16 cuBLAS; W8A8 brings a 128-row step and
    a prefill back to about bf16's time (docs/benchmarks-gpu.md). The activations' rounding is a
    second error beside the weights', which `fake_quantize(activations=True)` models (the build's
    FP8 gate for such a build). With `W8Matmul.a8_kernel` the tuner also times the kernel's FP8 form
    (`A8_FORM`: the rounded rows by the FP8 weights on the FP8 tensor cores, split-K fixed up in the
    launch) against `_scaled_mm` per W8A8 bucket and keeps it where it won: `_scaled_mm` read the
    weights at ~1 TB/s at 64 rows on an H100 (a third of the card's bandwidth). Off: measured within
    2 % of `_scaled_mm` in the step (docs/benchmarks-gpu.md, twenty-second session). With
    `W8Matmul.a16_kernel` (on) the tuner also times the kernel's W8A16 forms per W8A8 bucket (the rows
    as they are, nothing rounded) and keeps one where it beat W8A8: the product then leaves W8A8, and
    the op before it no longer rounds its rows (`W8Matmul.w8a8`). On an H100 at 64 rows the W8A16 forms
    beat the rounding plus `_scaled_mm` on the o and down products (22 layers: o 0.189 against 0.246 ms,
    down 0.327 against 0.474; the products alone, gpu_gemm.py).
With `W8Matmul.tma_kernel` the products of 16 rows and more also time the TMA form (`TMA_FORM`: the
`tl.dot` form with its tiles streamed into shared memory by Hopper's copy engine, tensor
descriptors), for dense weights up to `TMA_DENSE_ROWS` rows against cuBLAS: at 32-64 rows neither
cuBLAS nor the plain-load forms passed ~2.2 TB/s. Off: it lost to cuBLAS on every bf16 product at
32-64 rows on an H100 and moved neither step by more than 2.4 % (docs/benchmarks-gpu.md). At 33-64 rows
each TMA tile is timed warp-specialised too (`WS`: Triton's Hopper partitioning gives the copies warps
of their own, so the weights keep streaming while the MMAs wait; thirty-seventh session).
Weights kept in the engine's dtype (`DenseWeight`) go through the same kernel at up to
`DENSE_KERNEL_ROWS` rows where `tune` timed it faster than the dense product (cuBLAS), else that: at
one row cuBLAS's bf16 products ran at 1.3-2.5 TB/s on an H100 and added a split-K reduce kernel
each, the kernel's one-row forms took 10 % off a step's products (docs/benchmarks-gpu.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ...cpus import usable_cpus
from .kernels import cdiv, next_pow2
from .quant import QuantWeight, quantize_rows_fp8

log = logging.getLogger(__name__)

MAX_SKINNY_M = 128
# the most threads compiling the tuner's candidates at once by default (`compile_threads`): a bound on
# what the compiles hold in memory together, not a measured best
COMPILE_THREADS = 16
TUNE_ROWS = (1, 16, 32, 64, 128)  # the row buckets the engine tunes when it loads (`row_bucket`)
# products of more rows never launch with PDL: with it the 8-bit decode step at 128 rows was 9-16 %
# slower (H100, H200), which the tuner, timing each product alone, does not see (docs/benchmarks-gpu.md)
PDL_MAX_ROWS = 64
# weights in the engine's dtype run the kernel at most this many rows (where tuned faster than cuBLAS):
# H100, a step's products at 1 row 0.90x cuBLAS's, at 16 the step 0.93x; at 32 / 64 rows the kernel's
# best 1.03x / 1.02x (docs/benchmarks-gpu.md, nineteenth session): tuning them would only cost load time
DENSE_KERNEL_ROWS = 16
# FP8 products of more rows than this run as W8A8 where the GPU can (module docstring): H100, W8A8 ÷
# W8A16 step 1.25-1.28 at 32 rows, 0.94-0.96 at 64 (four runs), 0.73 at 128; prefill of 128 tokens
# 0.75-0.78. The decode graphs pad to powers of two, so from 33 rows is the 64-row graph: its step
# 1.670 -> 1.600 ms with this rule, timed in alternating rounds (nineteenth session)
W8A8_ROWS = 32


def row_bucket(m: int) -> int:
    """The rows a product's configuration is tuned for: 1 (a decode step of one stream: the CUDA-core
    form) or a power of two from 16 (`tl.dot` tiles have at least 16 rows)."""
    return 1 if m == 1 else max(16, next_pow2(m))


class W8Matmul:
    """Products with 8-bit weights (and `DenseWeight`s): `__call__(x, w, bias)`; the Triton kernel
    where it runs (see the module docstring), with a configuration per (row bucket, N, K) from `tune`
    or `default_config` (dense weights: from `tune` only, else cuBLAS). Split-K configurations keep
    their K slices in a float32 workspace and a tile counter of this object's (products run one after
    another on one stream, so one of each serves all)."""

    def __init__(self, tk, sms: int, pdl: bool = False, w8a8_rows: int | None = None):
        self._tk = tk
        self.sms = sms
        self.pdl = pdl  # programmatic dependent launch may be used (kernels.py): a choice of each config
        self.w8a8_rows = w8a8_rows  # FP8 products of more rows run as W8A8 (module docstring); None: never
        self.configs: dict[tuple[int, int, int], dict] = {}
        # W8A8 products may run the kernel's FP8 form where `tune` times it faster than
        # `torch._scaled_mm` (off: within 2 % of `_scaled_mm` in the step on an H100, docs/benchmarks-gpu.md)
        self.a8_kernel = False
        # W8A8 products may run the kernel's W8A16 forms instead (the rows as they are, nothing rounded)
        # where `tune` times them faster than W8A8 for their shape and row bucket (`w8a8`)
        self.a16_kernel = True
        # products of 16 rows or more may run the TMA form (TMA_FORM; weights in the engine's dtype up to
        # TMA_DENSE_ROWS) where `tune` times it fastest (off: lost to cuBLAS on an H100)
        self.tma_kernel = False
        self.tuned_from: str | None = None  # the cache file `tune` took its choices from, if any
        self.compile_s = 0.0  # spent compiling the candidates in parallel (`precompile`)
        self._ws: torch.Tensor | None = None
        self._count: torch.Tensor | None = None
        self._outgrown: list = []  # buffers a captured graph may still name: never freed

    def __call__(self, x: torch.Tensor, w: QuantWeight, bias=None) -> torch.Tensor:
        """x @ w^T (+ bias)."""
        m = x.shape[0]
        if self.w8a8(m, w):
            return self.scaled(x, w, bias)
        cfg = self.config(m, w)
        if cfg is None:
            return F.linear(x, w.widened() if self._tk is None or w.dense else self.widen(w), bias)
        y = self.launch(x, w, cfg)
        return y if bias is None else y + bias

    def config(self, m: int, w: QuantWeight) -> dict | None:
        """The kernel configuration a product of `m` rows with `w` runs; None: the dense product
        (8-bit weights widened first)."""
        if self._tk is None or m > MAX_SKINNY_M or m == 0:
            return None
        n, k = w.q.shape
        bm = row_bucket(m)
        cfg = self.configs.get((bm, n, k))
        return cfg if cfg is not None or w.dense else default_config(bm, n, k, self.sms)

    def w8a8(self, m: int, w: QuantWeight) -> bool:
        """Does a product of `m` rows with `w` run as W8A8? Where it may (`w8a8_eligible`), unless
        `tune` kept a W8A16 configuration of the kernel for its shape and row bucket (`a16_kernel`):
        then the op before leaves its rows unrounded too (llama.py's `fp8_input`)."""
        if not self.w8a8_eligible(m, w):
            return False
        if self._tk is None or m > MAX_SKINNY_M:
            return True
        cfg = self.configs.get((row_bucket(m), *w.q.shape))
        return cfg is None or cfg["FORM"] == A8_FORM

    def w8a8_eligible(self, m: int, w: QuantWeight) -> bool:
        """May a product of `m` rows with `w` run as W8A8: FP8 weights, more than `w8a8_rows` rows?
        (`torch._scaled_mm` wants K and N in multiples of 16.)"""
        n, k = w.q.shape
        return self.w8a8_rows is not None and m > self.w8a8_rows and w.q.dtype == torch.float8_e4m3fn \
            and n % 16 == 0 and k % 16 == 0

    def scaled(self, x: torch.Tensor, w: QuantWeight, bias=None) -> torch.Tensor:
        """The W8A8 product: `x`'s rows rounded to E4M3 (a scale each), FP8 tensor cores, `w.dtype` out."""
        return self.scaled_rows(*self.quantize_rows(x), w, bias)

    def scaled_rows(self, xq: torch.Tensor, sx: torch.Tensor, w: QuantWeight, bias=None) -> torch.Tensor:
        """The W8A8 product of rows already rounded (`quantize_rows_fp8`'s pair): `torch._scaled_mm`,
        or the kernel's FP8 form where `tune` timed it faster (`a8_kernel`)."""
        n, k = w.q.shape
        cfg = self.configs.get((row_bucket(xq.shape[0]), n, k)) if self._tk is not None else None
        y = self.launch(xq, w, cfg, sx) if cfg is not None and cfg["FORM"] == A8_FORM else self._scaled_mm(xq, sx, w)
        return y if bias is None else y + bias

    @staticmethod
    def _scaled_mm(xq: torch.Tensor, sx: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        return torch._scaled_mm(xq, w.q.t(), scale_a=sx, scale_b=w.scale.view(1, -1), out_dtype=w.dtype)

    def quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`quantize_rows_fp8(x)`, in one kernel where Triton runs."""
        if self._tk is None:
            return quantize_rows_fp8(x)
        m, k = x.shape
        if x.stride(1) != 1:
            x = x.contiguous()
        q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
        s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
        block = next_pow2(k)
        self._tk.fp8_rows[(m,)](x, q, s, x.stride(0), q.stride(0), k, BLOCK=block,
                                num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16),
                                **pdl_launch(self.pdl and m <= PDL_MAX_ROWS))
        return q, s

    def widen(self, w: QuantWeight) -> torch.Tensor:
        """`w.widened()` in one kernel (reads 1 byte a weight, writes 2; the torch ops wrote and read
        float32 copies in between: ~7x the traffic in every decode step that carries prompts)."""
        n, k = w.q.shape
        y = torch.empty((n, k), device=w.q.device, dtype=w.dtype)
        self._tk.w8_widen[(cdiv(n, 16), cdiv(k, 256))](w.q, w.scale, y, n, k, BN=16, BK=256, num_warps=4)
        return y

    def _buffers(self, numel: int, tiles: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The split-K workspace (at least `numel` floats) and tile counters (zero between launches:
        the kernel resets them). Grown only outside a CUDA graph capture: `tune` runs every
        configuration first, so the largest is allocated before the engine captures."""
        if self._ws is None or self._ws.numel() < numel or self._count.numel() < tiles:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("8-bit split-K workspace too small inside a CUDA graph capture: "
                                   "call W8Matmul.tune before capturing")
            if self._ws is not None:
                self._outgrown.append((self._ws, self._count))
            self._ws = torch.empty(max(numel, 0 if self._ws is None else self._ws.numel()),
                                   device=device, dtype=torch.float32)
            self._count = torch.zeros(max(tiles, 1024), device=device, dtype=torch.int32)
        return self._ws, self._count

    def launch(self, x: torch.Tensor, w: QuantWeight, cfg: dict, sx: torch.Tensor | None = None,
               warmup: bool = False) -> torch.Tensor:
        """x @ w^T by `w8_matmul` in configuration `cfg`; the FP8 form (A8_FORM) takes `x` as rows
        rounded to E4M3 and `sx` their scales [m, 1]. `warmup`: compile the kernel, launch nothing
        (`precompile`)."""
        m = x.shape[0]
        n, k = w.q.shape
        form = form_of(cfg, m)
        bm = 1 if form in GEMV_FORMS else max(16, next_pow2(m))
        bn, bk, split = cfg["BN"], cfg["BK"], cfg["SPLIT"]
        ks = cdiv(cdiv(k, split), bk) * bk
        split = cdiv(k, ks)  # every program has a non-empty slice
        grid = (cdiv(n, bn), split, cdiv(m, bm))
        y = torch.empty((m, n), device=x.device, dtype=w.dtype if form == A8_FORM else x.dtype)
        ws = cnt = y
        if split > 1:
            ws, cnt = self._buffers(split * grid[2] * bm * n, grid[0] * grid[2], x.device)
        pdl = pdl_launch(self.pdl and cfg.get("PDL", m <= PDL_MAX_ROWS))
        if form == TMA_FORM and tma_ready(x) and tma_ready(w.q):
            from triton.tools.tensor_descriptor import TensorDescriptor

            _launcher(self._tk.w8_matmul_tma, grid, warmup)(
                TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w.q, [bn, bk]),
                y if w.dense else w.scale, y, ws, cnt, m, n, k, ks, split, y.stride(0), grid[2] * bm * n,
                BM=bm, BN=bn, BK=bk, FIXUP=split > 1, IEEE=x.dtype == torch.float32, SCALED=not w.dense,
                WS=cfg.get("WS", False), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl)
            return y
        _launcher(self._tk.w8_matmul, grid, warmup)(
            x, w.q, y if w.dense else w.scale, y if sx is None else sx, y, ws, cnt, m, n, k, ks, split, x.stride(0),
            w.q.stride(0), y.stride(0), grid[2] * bm * n, BM=bm, BN=bn, BK=bk, FIXUP=split > 1,
            FORM=1 if form == TMA_FORM else form,  # operands TMA cannot read: the same tile by plain loads
            IEEE=x.dtype == torch.float32, SCALED=not w.dense, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **pdl)
        return y

    def tune(self, weights: list[QuantWeight], buckets: list[int], reps: int = 10,
             cache_dir: str | os.PathLike | None = None, own_rounding: frozenset = frozenset()) -> dict:
        """Time every candidate configuration for each distinct weight shape and row bucket, each
        as a CUDA graph of a few launches (how the engine runs them: a graph has no launch gaps,
        so a split's fix-up is judged at its real cost), keep the fastest; dense weights keep one
        only where it beat the dense product (cuBLAS, timed the same way), up to DENSE_KERNEL_ROWS
        rows. Call before capturing the engine's graphs. `cache_dir`: the choices are kept there
        (`tune_key`) and a later start with the same GPU, software and shapes takes them instead of
        timing again (each run once: compiled, the split-K workspace sized before any capture).
        `own_rounding`: the (N, K) of products whose rows no op before rounds to FP8 (a W8A8 product of
        theirs pays a rounding kernel of its own, which its W8A16 candidates are timed against too)."""
        if self._tk is None or not weights or weights[0].q.device.type != "cuda":
            return self.configs
        shapes = {}
        for w in weights:
            shapes.setdefault(tuple(w.q.shape), w)
        path = None
        if cache_dir:
            key = self.tune_key(list(shapes.values()), buckets, own_rounding)
            path = Path(cache_dir) / f"w8-tune-{key}.json"
            if self.take_tuned(path, shapes):
                return self.configs
        self._time_candidates(shapes, buckets, reps, own_rounding)
        if path is not None:
            save_tuned(path, {key: cfg for key, cfg in self.configs.items() if key[1:] in shapes})
        return self.configs

    def take_tuned(self, path: Path, shapes: dict) -> bool:
        """Take the configurations `save_tuned` kept in `path` for these weights ({(N, K): weight});
        each runs once now (compiled, the split-K workspace sized before any capture). False where
        there are none, or they name a shape these weights do not have."""
        cached = load_tuned(path)
        if cached is None or not all((n, k) in shapes for _, n, k in cached):
            return False
        runs = []
        for (bm, n, k), cfg in cached.items():
            w, a8 = shapes[(n, k)], cfg["FORM"] == A8_FORM  # the FP8 form takes rounded rows and their scales
            x = torch.zeros((bm, k), device=w.q.device, dtype=torch.float8_e4m3fn if a8 else w.dtype)
            runs.append((partial(self.launch, x, w, sx=torch.ones((bm, 1), device=w.q.device) if a8 else None), cfg))
        self.precompile(runs)
        for run, cfg in runs:
            run(cfg)
        self.configs.update(cached)
        self.tuned_from = str(path)
        return True

    def tune_key(self, weights: list[QuantWeight], buckets: list[int], own_rounding: frozenset = frozenset()) -> str:
        """What a tuning's choices depend on, hashed: the GPU, torch, Triton, this module's and the
        kernels' source, the launch options and the weights' shapes and formats."""
        import triton

        from . import kernels

        dev = weights[0].q.device
        code = hashlib.sha256(Path(__file__).read_bytes() + Path(kernels.__file__).read_bytes()).hexdigest()
        blob = dict(gpu=torch.cuda.get_device_name(dev), cc=list(torch.cuda.get_device_capability(dev)),
                    sms=self.sms, torch=torch.__version__, triton=triton.__version__, code=code, pdl=self.pdl,
                    w8a8_rows=self.w8a8_rows, a8_kernel=self.a8_kernel, tma_kernel=self.tma_kernel,
                    a16_kernel=self.a16_kernel, own_rounding=sorted(map(list, own_rounding)),
                    buckets=sorted(set(buckets)),
                    weights=sorted([*w.q.shape, w.fmt, str(w.dtype)] for w in weights))
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]

    def tuning_jobs(self, shapes: dict, buckets: list[int], own_rounding: frozenset = frozenset()) -> list[tuple]:
        """What `tune` times for these weights ({(N, K): weight}) and row buckets: (key, configurations,
        run(cfg, warmup=False), the product without the kernel (None: keep one in any case)), each on a
        random sample of the bucket's rows. A W8A8 bucket times the kernel's W8A16 forms (`a16_kernel`)
        and FP8 form (`a8_kernel`) against `torch._scaled_mm` on rows rounded by the op before, or, for
        the shapes in `own_rounding`, by a rounding kernel of the product's own."""
        jobs = []
        for (n, k), w in shapes.items():
            for bm in sorted({row_bucket(b) for b in buckets if 0 < b <= MAX_SKINNY_M}):
                if self.w8a8_eligible(bm if bm == 1 else 2 if bm == 16 else bm // 2 + 1, w):  # its fewest rows
                    cfgs = (candidate_configs(bm, n, k, self.sms, pdl=self.pdl, fmt=w.fmt, tma=self.tma_kernel)
                            if self.a16_kernel else [])
                    if self.a8_kernel:
                        cfgs += candidate_configs(bm, n, k, self.sms, pdl=self.pdl, fmt=w.fmt, a8=True)
                    if not cfgs:  # `_scaled_mm` on every row: nothing to time
                        continue
                    x = torch.randn((bm, k), device=w.q.device, dtype=w.dtype)
                    xq, sx = quantize_rows_fp8(x)
                    own = (n, k) in own_rounding
                    jobs.append(((bm, n, k), cfgs, partial(self._launch_a16_or_a8, x, xq, sx, w),
                                 (lambda x=x, w=w: self._scaled_mm(*self.quantize_rows(x), w)) if own
                                 else partial(self._scaled_mm, xq, sx, w)))
                    continue
                if w.dense and bm > (TMA_DENSE_ROWS if self.tma_kernel else DENSE_KERNEL_ROWS):
                    continue
                x = torch.randn((bm, k), device=w.q.device, dtype=w.dtype)
                jobs.append(((bm, n, k), candidate_configs(bm, n, k, self.sms, pdl=self.pdl, fmt=w.fmt,
                                                           tma=self.tma_kernel),
                             partial(self.launch, x, w), partial(F.linear, x, w.q) if w.dense else None))
        return jobs

    def _launch_a16_or_a8(self, x, xq, sx, w, cfg: dict, warmup: bool = False):
        """A W8A8 bucket's candidate: the FP8 form on the rounded rows, a W8A16 form on the rows as they are."""
        if cfg["FORM"] == A8_FORM:
            return self.launch(xq, w, cfg, sx, warmup=warmup)
        return self.launch(x, w, cfg, warmup=warmup)

    def _time_candidates(self, shapes: dict, buckets: list[int], reps: int, own_rounding: frozenset) -> None:
        jobs = self.tuning_jobs(shapes, buckets, own_rounding)
        self.precompile([(run, cfg) for _, cfgs, run, _ in jobs for cfg in cfgs])
        for key, cfgs, run, baseline in jobs:
            self._keep_fastest(key, cfgs, run, reps, None if baseline is None else graph_median_ms(baseline, reps))

    def precompile(self, runs: list) -> None:
        """Compile the kernels of `runs` ([(run, cfg)], `run(cfg, warmup=True)` compiling without a
        launch) in `compile_threads()` threads at once, through Triton's `AsyncCompileMode`, before any
        is launched; else each compiles on its first launch, one after another (a fresh H100 spent
        45-92 s of an engine's start so: docs/benchmarks-gpu.md). A compile that fails here is left to
        that first launch, which reports it (`_keep_fastest` skips such a configuration)."""
        import triton

        threads = compile_threads()
        mode = getattr(triton, "AsyncCompileMode", None)  # Triton 3.4 on
        if threads < 2 or mode is None or not runs:
            return
        t = time.perf_counter()
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="tritonchat-compile") as pool:
                try:
                    compiling = mode(pool, ignore_errors=True)  # a failed compile: left to its launch
                except TypeError:  # the first Triton versions with the mode: a failure ends it here
                    compiling = mode(pool)
                with compiling:
                    for run, cfg in runs:
                        run(cfg, warmup=True)
        except Exception:  # noqa: BLE001 - the launches below compile what is missing
            log.warning("compiling the kernel's candidates in %d threads failed; each compiles on its first "
                        "launch instead", threads, exc_info=True)
            return
        self.compile_s += time.perf_counter() - t
        log.info("the kernel's %d configurations compiled in %.1f s (%d threads)", len(runs),
                 time.perf_counter() - t, threads)

    def _keep_fastest(self, key: tuple, cfgs: list[dict], run, reps: int, baseline: float | None = None) -> None:
        """Time `run(cfg)` for each configuration and keep the fastest as `configs[key]`, only where it
        beat `baseline` (ms of the product without the kernel; None: keep one in any case)."""
        best_ms, best = float("inf") if baseline is None else baseline, None
        for cfg in cfgs:
            try:
                ms = graph_median_ms(lambda: run(cfg), reps)
            except Exception:  # noqa: BLE001 - e.g. out of shared memory for this tile
                continue
            if ms < best_ms:
                best_ms, best = ms, cfg
        if best is not None:
            self.configs[key] = best


def compile_threads() -> int:
    """Threads that compile the tuner's kernels at once (`W8Matmul.precompile`):
    `TRITONCHAT_COMPILE_THREADS`, else one per CPU this process may use (`usable_cpus`), up to
    COMPILE_THREADS; 1 compiles each on its first launch."""
    value = os.environ.get("TRITONCHAT_COMPILE_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"TRITONCHAT_COMPILE_THREADS must be a whole number, not {value!r}") from None
    return min(COMPILE_THREADS, usable_cpus())  # a container's cpuset and CPU limit (cpus.py)


def _launcher(kernel, grid, warmup: bool):
    """`kernel[grid]`, or with `warmup` the kernel's compile alone (Triton's `JITFunction.warmup`; under
    `AsyncCompileMode` it returns at once, the compile running in the mode's threads)."""
    return partial(kernel.warmup, grid=grid) if warmup else kernel[grid]


def tune_cache_dir() -> Path | None:
    """Where the engine keeps `W8Matmul.tune`'s choices between starts: $TRITONCHAT_TUNE_CACHE
    (empty: nowhere), else ~/.cache/tritonchat (next to Triton's own compile cache, ~/.triton)."""
    env = os.environ.get("TRITONCHAT_TUNE_CACHE")
    if env is not None:
        return Path(env) if env.strip() else None
    return Path.home() / ".cache" / "tritonchat"


def save_tuned(path: Path, configs: dict) -> None:
    """Write `configs` ({(rows, N, K): config}) to `path`, whole or not at all; a cache that cannot
    be written (a read-only home) costs the next start its tuning, nothing else."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([[list(key), cfg] for key, cfg in sorted(configs.items())]))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not keep the 8-bit kernel's tuning in %s: %s", path, exc)


def load_tuned(path: Path) -> dict | None:
    """The configurations `save_tuned` wrote to `path`; None where there are none or they do not read."""
    try:
        rows = json.loads(path.read_text())
        configs = {tuple(int(v) for v in key): dict(cfg) for key, cfg in rows}
    except (OSError, ValueError, TypeError) as exc:
        if path.exists():
            log.warning("ignoring the 8-bit kernel's tuning in %s: %s", path, exc)
        return None
    if not all(len(key) == 3 and {"FORM", "BN", "BK", "SPLIT"} <= cfg.keys() for key, cfg in configs.items()):
        return None
    return configs


def _split(n: int, k: int, bn: int, bk: int, sms: int) -> int:
    split = 1
    while cdiv(n, bn) * split < sms and k // (split * 2) >= bk:
        split *= 2
    return split


# the kernel's FORM (kernels.py, w8_matmul) by name
FORMS = {0: "gemv", 1: "dot", 2: "dot-t", 3: "gemv-late", 4: "gemv-bits", 5: "dot-a8", 6: "dot-tma"}
A8_FORM = 5  # W8A8: FP8 rows by FP8 weights, nothing widened
TMA_FORM = 6  # form 1 with the tiles streamed by Hopper's TMA (kernels.py, w8_matmul_tma)
# weights in the engine's dtype try the TMA form up to this many rows (the other forms: DENSE_KERNEL_ROWS)
TMA_DENSE_ROWS = 64
# the TMA form is also timed warp-specialised (`WS`: producer warps keep the copies going while the
# consumer warps run the MMAs) in this row bucket alone: Triton 3.6 partitions the loop only where the
# tile's rows fill a warpgroup's MMA (64; at 16 and 32 it compiles the plain pipelined loop), and
# Triton 3.9's partitioning pass fails on 128-row tiles
WS_ROWS = 64
GEMV_FORMS = (0, 3, 4)  # one row on the CUDA cores


def form_of(cfg: dict, m: int) -> int:
    """The form a configuration runs `m` rows in: the CUDA-core forms hold one row, so more rows take
    `tl.dot` (a bucket's configurations are tuned for its fewest rows, `row_bucket`)."""
    return cfg["FORM"] if m == 1 or cfg["FORM"] not in GEMV_FORMS else 1


def default_config(bm: int, n: int, k: int, sms: int) -> dict:
    if bm == 1:
        return dict(FORM=0, BN=16, BK=256, SPLIT=_split(n, k, 16, 256, sms), num_warps=4, num_stages=4)
    bn = 32 if bm >= 64 else 64
    return dict(FORM=1, BN=bn, BK=128, SPLIT=_split(n, k, bn, 128, sms), num_warps=4, num_stages=4)


def candidate_configs(bm: int, n: int, k: int, sms: int, pdl: bool = False, fmt: str | None = None,
                      a8: bool = False, tma: bool = False) -> list[dict]:
    """The configurations `tune` times for `bm` rows: each form's tiles that fit the registers, whole
    K or split to fill the SMs; with `pdl` and at most PDL_MAX_ROWS rows, each launched with
    programmatic dependent launch and without (`PDL`); `fmt` (the weights': "int8", "fp8", or "dtype"
    for a `DenseWeight`; None: every form) drops the forms that lost or cannot run; `a8`: the FP8
    form's (A8_FORM) only, for a W8A8 product of at least 16 rows; `tma`: from 16 rows the TMA form's
    too (TMA_FORM; for weights in the engine's dtype beyond DENSE_KERNEL_ROWS rows, only those), at
    WS_ROWS rows each also warp-specialised (`WS`, `ws_stages`). Each distinct tile, whole K or split,
    with PDL or without, is a Triton compile when the engine loads (`precompile`), shared by the shapes whose integer arguments Triton specializes alike (K and the
    split are not compile-time constants, but a split of 1 or divisible by 16 is specialized)."""
    tiles = []
    if a8:  # FP8 tiles of rows and weights, staged in shared memory (num_stages 4: ~200 KB at most)
        tiles += [(A8_FORM, bn, bk) for bn in (64, 128) for bk in (64, 128, 256) if (max(16, bm) + bn) * bk <= 49152]
    elif bm == 1:  # one row: on the CUDA cores (BN x BK widened values in registers), or padded to 16 for tl.dot
        tiles += [(0, bn, bk) for bn in (16, 32, 64) for bk in (128, 256, 512) if bn * bk <= 8192]
        # the row sums once per program (a BN x BK float32 sum in registers besides the tile); the
        # integer widening for INT8 weights only (`fmt`): it lost on every FP8 product (H100)
        tiles += [(f, bn, bk) for f in ((3, 4) if fmt in (None, "int8") else (3,)) for bn in (8, 16, 32)
                  for bk in (128, 256, 512) if bn * bk <= 4096]
    rows = max(16, bm)
    tiles += [] if a8 else [(1, bn, bk) for bn in (16, 32, 64) for bk in (128, 256, 512)
                            if rows * bk <= 128 * 128 and bn * bk <= 16384]
    if bm >= 16 and not a8:  # the weight as the MMA's 64 or 128 rows
        tiles += [(2, bn, bk) for bn in (64, 128) for bk in (64, 128) if bn * bk <= 8192]
    if bm >= 16 and tma and not a8:  # rows and weights staged in shared memory by TMA (4 stages: <= ~200 KB)
        wb = 2 if fmt == "dtype" else 1
        tma_tiles = [(TMA_FORM, bn, bk) for bn in (64, 128) for bk in (64, 128, 256)
                     if (2 * rows + wb * bn) * bk <= 49152]
        tiles = tma_tiles if fmt == "dtype" and bm > DENSE_KERNEL_ROWS else tiles + tma_tiles
    configs = [dict(FORM=form, BN=bn, BK=bk, SPLIT=split, PDL=p, num_warps=4, num_stages=4)
               for form, bn, bk in tiles for split in _splits(bm, n, k, bn, bk, sms)
               for p in ((True, False) if pdl and bm <= PDL_MAX_ROWS else (False,))]
    if bm == WS_ROWS:  # each TMA tile also warp-specialised, with the most stages that fit beside it
        configs += [{**c, "WS": True, "num_stages": stages} for c in configs
                    if c["FORM"] == TMA_FORM and (stages := ws_stages(bm, c["BN"], c["BK"], fmt))]
    return configs


def ws_stages(bm: int, bn: int, bk: int, fmt: str | None) -> int:
    """The stages of a warp-specialised TMA tile of `bm` rows: Triton's Hopper
    partitioning keeps about one stage more in shared memory than it is given (compiled for sm_90 by
    Triton 3.6: 64 x 128 x 128 bf16 tiles took 213 KB at 3 stages, 262 KB at 4), so the most of 4, 3
    or 2 with that stage and the epilogue's ~16 KB within an H100's 227 KB; 0: none fits."""
    stage = (2 * bm + (2 if fmt == "dtype" else 1) * bn) * bk
    return next((s for s in (4, 3, 2) if (s + 1) * stage + 16384 <= 227 * 1024), 0)


def _splits(bm: int, n: int, k: int, bn: int, bk: int, sms: int) -> list[int]:
    """Whole K, or split to fill the SMs once; up to 16 rows also 2x and 4x that: a narrow product's
    time is mostly latency, and more programs an SM keep more weight reads in flight (the workspace,
    split x rows x N floats, stays small at so few rows)."""
    s = _split(n, k, bn, bk, sms)
    more = (2 * s, 4 * s) if bm <= 16 else ()
    return sorted({1, s} | {m for m in more if k // m >= bk})


def tma_ready(t: torch.Tensor) -> bool:
    """Can Hopper's TMA read `t` through a tensor descriptor (rows of unit stride, the start and
    the row stride in multiples of 16 bytes)?"""
    return t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def pdl_launch(pdl: bool) -> dict:
    """A Triton launch's keywords and constexprs for programmatic dependent launch (kernels.py):
    none where it is off (the interpreter knows no `launch_pdl`)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {}


def graph_median_ms(fn, reps: int, launches: int = 8) -> float:
    """Device time of one `fn()` in ms, `launches` of them captured in one CUDA graph (median of
    `reps` replays): what it costs inside the engine's graphs, without the host's launch gaps."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compiles, grows the workspace
        s.synchronize()
        g = torch.cuda.CUDAGraph()
        g.capture_begin()
        for _ in range(launches):
            fn()
        g.capture_end()
    torch.cuda.current_stream().wait_stream(s)
    return cuda_median_ms(g.replay, reps) / launches


def cuda_median_ms(fn, reps: int, warm: int = 1) -> float:
    """Median device time of `fn()` in ms (CUDA events around each call) over `reps` calls (the
    benchmarks use it too: benchmarks/common.py)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]

"""PyTorch engine: a compact Llama-family forward over a static slot KV cache, with CUDA graphs.

`TorchEngine` is the `Engine` API (`prefill`, `prefill_batch`, `decode`, `decode_greedy`, `decode_greedy_begin`,
`release`, `length`, `describe`, `warmup`) over a KV cache of `max_slots` slots: a sequence of length L occupies
positions [0, L) of its slot, as in `engines.ort`. Nothing is ever re-packed: prefill writes [slot, :, :n], a
decode step writes each new K/V column at [slot, :, L] and attends over [0, L] of that slot.

Prefill runs every admitted prompt in one forward (packed tokens; attention varlen with the Triton
attention, else causal SDPA per prompt over the right-padded batch); on CUDA that forward is padded
to a bucket and replayed as a CUDA graph (padding tokens write into the dummy slot). With the Triton
attention the bucket is the token count alone, so `warmup()` captures them all. A greedy decode step
is one graph replay and two copies (`_step_body`); it can take its tokens from the step launched
just before it, still on the device (`chain`), and carry new prompts (`prompts`).

The parts, one job each:
  * `llama.py`: the native forward (weights fused at load, the KV cache, the torch and Triton ops);
  * `kernels.py`: the Triton kernels and the decode attention's launch configuration;
  * `layout.py`: the int64 inputs the host writes for a step or a prefill, and the graph buckets;
  * `graphs.py`: CUDA graph capture and replay of the three kinds of step;
  * `hf_fallback.py`: transformers itself, for architectures without a native forward;
  * `sample.py`, `draw_kernel.py`: sampled tokens drawn on the device (penalties, the draw after its sort);
  * here: the API, argument checks, per-slot lengths, the step body and the ids coming back (`_Step`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch

from ..base import Engine
from .graphs import StepGraphs, batch_sizes
from .hf_fallback import HFSlots
from .kernels import load_kernels, pdl_supported
from .layout import BAN_IDS, IN_ROWS, MIX_PROMPTS, Layout
from .llama import Llama, native_blocker
from .matmul import TUNE_ROWS, W8A8_ROWS, tune_cache_dir
from .quant import w8a8_supported
from .draw_kernel import for_engine as draw_kernel_for
from .sample import DrawInputs, TokenCounts, choose_drawn, draw, packed_body

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_RING = 4  # decode steps whose ids can be in flight at once


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (expected bfloat16, float16 or float32)") from None


class TorchEngine(Engine):
    prompt_chunks = False  # its prompts ride inside decode steps or run as one captured prefill
    batches_cached_prefills = True
    can_sample = True  # sampled rows drawn, penalties applied on the device (sample.py)

    def __init__(self, model_path: str | os.PathLike | None = None, max_slots: int = 8,
                 max_seq_len: int = 2048, device: str = "cuda", dtype: str = "bfloat16",
                 cuda_graphs: bool = True, graph_batch_sizes: list[int] | None = None, *,
                 model=None, kernels: str = "auto", attention: str = "auto",
                 length_bucket: int = 256, prefill_graphs: bool = True, prefill_graph_tokens: int = 2048,
                 mix_tokens: int = 1024, weights: str = "dtype", pdl="auto", w8a8_rows="auto",
                 dense_kernel: bool = True, tune_cache="auto", **_unused):
        """`model_path`: a Hugging Face model folder; or pass an already built transformers
        `model=` (its weights are read, fused and cast; unfused ones already on `device` in `dtype`
        are shared, not copied). `kernels`: "auto" | "triton" | "torch"; `attention`: "auto" |
        "triton" (in-place split-K decode attention) | "sdpa" (gather + masked SDPA); "auto" picks
        Triton on CUDA when it imports. `length_bucket`: SDPA attention length granularity in graphs.
        `graph_batch_sizes`: the padded batch sizes of the decode graphs (`graphs.batch_sizes`).
        `prefill_graphs` (with `cuda_graphs`): run prefills of up to `prefill_graph_tokens` prompt
        tokens as CUDA graphs, one per bucket (`Layout.buckets`; with the Triton attention all
        captured by `warmup()`; why: docs/benchmarks-gpu.md, "Figures behind settings in the code").
        `mix_tokens`: prompt tokens (of at most MIX_PROMPTS prompts) that one decode step can carry
        (`decode_greedy_begin(prompts=...)`); 0: none (`can_mix` False). `weights`: "dtype" | "int8" |
        "fp8" (the products' weights in 8 bits with a scale per output channel: `quant.py`; native
        path only). `pdl`: "auto" | True | False: launch the decode step's Triton kernels with
        programmatic dependent launch (each starts while the one before ends: kernels.py); "auto":
        where it runs (Hopper on, a Triton with grid dependency control). `w8a8_rows` (FP8 weights):
        products of more rows than this also round their activations to FP8 (`matmul.py`); "auto":
        `matmul.W8A8_ROWS` where the device can (Hopper on); None: never; a number forces it.
        `dense_kernel` (weights in `dtype`, Triton kernels): products of up to `matmul.DENSE_KERNEL_ROWS`
        rows run the 8-bit products' kernel where `warmup()` times it faster than cuBLAS; False: cuBLAS
        always. `tune_cache`: the folder where `warmup()` keeps the kernel's tuning for the next start
        ("auto": `matmul.tune_cache_dir()`; None: time it on every start)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("TorchEngine(device='cuda') but torch sees no CUDA device")
        self.dtype = _as_dtype(dtype)
        self.max_slots = int(max_slots)
        self.max_seq_len = int(max_seq_len)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.pdl = False
        self.tune_cache = tune_cache_dir() if tune_cache == "auto" else tune_cache
        # steps whose sequences all fit in `split_min` positions take decode graphs of their own whose
        # attention splits nothing (`_attn_span`); False: the whole cache's split every step (benchmarks)
        self.short_span = True
        self.length_bucket = max(1, int(length_bucket))
        self._lengths = np.zeros(self.max_slots, dtype=np.int64)

        owned = model is None
        if model is None:
            if model_path is None:
                raise ValueError("TorchEngine needs model_path or model=")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=self.dtype)
        model.eval()
        self.config = model.config
        self.blocker = native_blocker(model, self.max_seq_len)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._counts = TokenCounts(self.max_slots + 1, self.vocab_size, self.device)  # for penalties

        if self.blocker is not None and weights != "dtype":
            raise ValueError(f"weights={weights!r} needs the native forward, which this model has not: {self.blocker}")
        if self.blocker is not None:
            warnings.warn(f"TorchEngine: no native forward ({self.blocker}); using the slow "
                          "transformers fallback (one DynamicCache per slot, one sequence at a time)")
            self.path = "hf-fallback"
            self.cuda_graphs = False
            self.kernels = self.attention = "hf"
            self.llama = None
            self._hf = HFSlots(model.to(device=self.device, dtype=self.dtype), self.max_slots, self.device)
            self._last_ids = None  # its steps never chain: their tokens come from the host
            return
        self.path = "native"
        self._hf = None
        self.can_chain = True  # decode_greedy_begin(chain=...) launches without waiting
        self.mix_tokens = max(0, int(mix_tokens))
        self.mix_prompts = MIX_PROMPTS
        self.can_mix = self.mix_tokens > 0  # decode_greedy_begin(prompts=...): prompts ride in a step

        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, not {kernels!r}")
        tk = load_kernels() if kernels in ("auto", "triton") or attention == "triton" else None
        if kernels == "triton" and tk is None:
            raise RuntimeError("kernels='triton' but Triton does not import")
        use_triton = tk is not None and (kernels == "triton" or (kernels == "auto" and self.device.type == "cuda"))
        self.kernels = "triton" if use_triton else "torch"
        self._draw_kernel = draw_kernel_for(use_triton, self.device, self.vocab_size)
        if attention == "auto":
            attention = "triton" if tk is not None and self.device.type == "cuda" else "sdpa"
        if attention == "triton" and tk is None:
            raise RuntimeError("attention='triton' but Triton does not import")
        if attention not in ("triton", "sdpa"):
            raise ValueError(f"attention must be auto, triton or sdpa, not {attention!r}")
        self.attention = attention
        # a prompt on a slot's cached KV: the varlen attention reads keys from the cache at data-given positions
        self.can_reuse_prefix = attention == "triton"
        can_pdl = self.kernels == "triton" and pdl_supported(tk, self.device)
        if pdl is True and not can_pdl:
            raise RuntimeError("pdl=True but programmatic dependent launch needs the Triton kernels on a CUDA "
                               "device of compute capability 9.0 or later and a Triton with grid dependency control")
        self.pdl = can_pdl and pdl is not False
        if w8a8_rows == "auto":
            w8a8_rows = W8A8_ROWS if weights == "fp8" and w8a8_supported(self.device, self.dtype) else None
        self.llama = Llama(model, max_slots=self.max_slots, max_seq_len=self.max_seq_len, device=self.device,
                           dtype=self.dtype, kernels=self.kernels, attention=attention, tk=tk, weights=weights,
                           pdl=self.pdl, w8a8_rows=None if w8a8_rows is None or weights != "fp8" else int(w8a8_rows),
                           dense_kernel=bool(dense_kernel))
        if owned:
            del model

        self.layout = Layout(attention == "triton", self.max_slots, self.max_seq_len, self.length_bucket)
        sizes = batch_sizes(graph_batch_sizes, self.max_slots)
        self.graph_batch_sizes = sizes
        self.prefill_graphs = bool(prefill_graphs) and self.cuda_graphs
        self.prefill_graph_tokens = int(prefill_graph_tokens)
        # each slot's last id (the dummy slot last), written by every step: a chained step reads its tokens here
        self._last_ids = torch.zeros(self.max_slots + 1, dtype=torch.int64, device=self.device)
        self._last_step = None
        self.graphs = StepGraphs(self.device, self.layout, sizes, last_ids=self._last_ids,
                                 mix_tokens=self.mix_tokens, buffers=self.cuda_graphs)
        self.captures = self.graphs.captures  # counts and seconds of the graphs captured so far
        if self.cuda_graphs:
            # pinned buffers and events for the steps' ids, used in turn (see `_Step`)
            top = sizes[-1] + MIX_PROMPTS
            self._ids_host = [torch.zeros(top, dtype=torch.int64).pin_memory() for _ in range(_RING)]
            self._ids_owner: list = [None] * _RING
            self._events = [torch.cuda.Event() for _ in range(_RING)]
            self._ring = 0

    # -- the model's and the layout's parts, as tests and benchmarks reach them ------------------
    @property
    def layers(self):
        """The native model's layers (weights and K/V cache of each)."""
        return self.llama.layers

    @property
    def split_min(self) -> int:
        """Cache positions up to which the decode attention splits no sequence."""
        return self.llama.split_min

    @split_min.setter
    def split_min(self, value: int) -> None:
        self.llama.split_min = value

    @property
    def _sms(self) -> int:
        """SMs the decode attention's splits are sized for (tests pin it: one split, or several)."""
        return self.llama.sms

    @_sms.setter
    def _sms(self, value: int) -> None:
        self.llama.sms = value

    def _splits(self, b: int, span: int | None = None) -> int:
        return self.llama.splits(b, span)

    def _attn_span(self, top: int):
        """Positions the decode attention of a step may read, its longest sequence holding `top`:
        the SDPA attention's length bucket; with the Triton attention the whole cache (None, split
        for it where it is long), or `split_min` while `top` fits in it (`short_span`): a graph of its
        own whose attention splits nothing, no combine kernel (a cache longer than `split_min` split
        every step, ~2 us a layer at 1-16 rows at any length: docs/benchmarks-gpu.md)."""
        if self.attention != "triton":
            return self.layout.length_bucket_of(top)
        if self.path != "native" or not self.short_span or top > self.split_min or self.max_seq_len <= self.split_min:
            return None
        return self.split_min

    def _prefill_buckets(self, lens: np.ndarray) -> tuple:
        return self.layout.buckets(lens)

    def _warmup_prefill_keys(self):
        return self.layout.warmup_keys(self.prefill_graph_tokens)

    def _mix_cols(self, key) -> int:
        return self.layout.mix_cols(key)

    def _prefill_layout(self, slots, ids, lens, key, mixed: bool = False) -> np.ndarray:
        return self.layout.build(slots, ids, lens, key, mixed)

    def _step_inputs(self, a: np.ndarray, n: int, slots, tokens, pos, chained: bool, ban, cols=None,
                     pslots=()) -> None:
        self.layout.step_inputs(a, n, slots, tokens, pos, chained, ban, cols, pslots)

    # -- the device side of a step ---------------------------------------------------------------
    def _prefill_body(self, buf: torch.Tensor, key) -> torch.Tensor:
        """Logits [prompts, vocab] of the prefill whose inputs are `buf` (see `Layout.build`):
        projections and MLP over the packed tokens, attention per prompt."""
        return self.llama.prefill_logits(self.layout.split(buf, key))

    def _step_body(self, inp: torch.Tensor, tb, mix=None):
        """One decode step from its input rows `inp` [IN_ROWS, b] (see `Layout.step_inputs`): logits
        [b, vocab] (the model's dtype: the argmax of bf16 logits is that of their exact float32
        copy, which the old extra kernel made; banned cells -inf) and their argmax [b], which also goes to
        `_last_ids` (per slot) for a chained step. Everything a greedy step needs happens here, so
        a graph replay plus two copies is the whole step on the host: each extra op was a GIL
        release that the other threads of the server process could hold on to. `mix` = (prompt
        layout, key): the step also runs prompts (`Llama.mixed_logits`); then the last
        `_mix_cols(key)` columns of `inp` stand for the prompts (their slots and bans; padding: the
        dummy slot)."""
        b = inp.shape[1] - (0 if mix is None else self.layout.mix_cols(mix[1]))
        slots = inp[1]
        tok = torch.where(inp[3, :b] > 0, self._last_ids[slots[:b]], inp[0, :b])
        if mix is None:
            logits = self.llama.decode_logits(tok, slots, inp[2], tb)
        else:
            logits = self.llama.mixed_logits(tok, slots[:b], inp[2, :b], tb, self.layout.split(*mix, mixed=True))
        ban = inp[4:].t()  # [rows, BAN_IDS]; -1: nothing (its cap is +inf, which `amin` ignores)
        cap = torch.where(ban >= 0, float("-inf"), float("inf")).to(logits.dtype)
        logits.scatter_reduce_(1, ban.clamp(min=0), cap, reduce="amin", include_self=True)
        ids = logits.argmax(dim=-1)
        self._last_ids.index_copy_(0, slots, ids)  # padding rows all write the dummy slot's
        return logits, ids

    def _launch(self, slots: np.ndarray, tokens, pos: np.ndarray, chained: bool = False, ban=None, prompts=None,
                draws=None):
        """Run one decode step on the device; return its device (logits, greedy ids, decode
        columns): rows [n, columns) are padding, and a step carrying `prompts` ((slots, token ids,
        lengths)) has their first tokens' rows from `columns` on. `chained`: the decode rows'
        tokens are the last ids of their slots, still on the device, instead of `tokens`. `ban`:
        ids masked out of some rows before the argmax. `draws`: rows whose token is drawn (sample.py),
        after the graph, from its banned logits."""
        n = len(slots)
        # a step carrying prompts reads the whole cache (one graph per prompt bucket is enough)
        tb = None if prompts is not None and self.attention == "triton" else \
            self._attn_span(int(pos.max()) + 1 if n else 1)
        b = self.graphs.batch_size(n) if self.cuda_graphs else None
        late = ban is not None and len(ban.ids) > BAN_IDS  # too many for the graph: banned after it
        inside = None if late else ban
        mix = key = None
        if prompts is not None:
            pslots, pids, lens, first = prompts
            key = self.layout.buckets(lens) if b is not None else self.layout.exact_key(lens)
            if b is not None and self.attention != "triton":
                b = None  # padded prompts: eager (the key has too many shapes to capture up front)
        if b is None:
            b = n
            k = 0 if key is None else self.layout.mix_cols(key)
            a = np.empty((IN_ROWS, n + k), dtype=np.int64)
            if key is None:
                self.layout.step_inputs(a, n, slots, tokens, pos, chained, inside)
            else:
                self.layout.step_inputs(a, n, slots, tokens, pos, chained, inside, n, pslots)
                playout = self.layout.build(pslots, pids, lens, key, mixed=True, first=first)
                mix = (torch.from_numpy(playout).to(self.device), key)
            if tb is not None and self.attention != "triton":
                tb = int(pos.max()) + 1 if n else 1  # eager: the exact length, no bucket
            inp = torch.from_numpy(a).to(self.device, non_blocking=True)
            logits, ids = self._step_body(inp, tb, mix)
            dev_slots = inp[1]
        elif key is None:
            logits, ids, dev_slots = self.graphs.run_decode(
                b, tb, self._step_body, lambda a: self.layout.step_inputs(a, n, slots, tokens, pos, chained, inside))
        else:
            playout = self.layout.build(pslots, pids, lens, key, mixed=True, first=first)
            logits, ids, dev_slots = self.graphs.run_mixed(
                b, tb, key, self._step_body,
                lambda a: self.layout.step_inputs(a, n, slots, tokens, pos, chained, inside, b, pslots), playout)
        cols = None if key is None else b  # where the prompts' columns start
        if late:
            ids = self._argmax_banned(logits, dataclasses.replace(ban, rows=self.layout.row_cols(ban.rows, n, cols)))
            self._last_ids.index_copy_(0, dev_slots, ids)
        if draws is not None:  # their tokens into `ids`, and into the slots' last ids
            all_slots = slots if prompts is None else np.concatenate([slots, prompts[0]])
            choose_drawn(logits, ids, draws, self.layout.row_cols(draws.rows, n, cols), all_slots[draws.rows],
                         dev_slots, self._counts, self._last_ids, self.graphs if self.cuda_graphs else None,
                         self._draw_kernel)
        return logits, ids, b

    def warmup(self) -> None:
        """Capture the decode graphs of every batch size now (SDPA attention: the first length
        bucket), run one small batched prefill (kernel selection, allocator pools) and capture
        the prefill graphs: a capture on first use stalls every running stream (figures:
        docs/benchmarks-gpu.md, "Figures behind settings in the code"). With the Triton attention
        that is every token bucket (budget 2,048: 10 graphs), so no prefill is captured while
        serving; with SDPA one prompt of every width bucket (buckets of several prompts are
        captured on first use)."""
        if self.path == "native":
            # the kernel's products' configurations, timed now: a graph captures the one it was given
            self.llama.mm.tune(self.llama.kernel_weights(), TUNE_ROWS, cache_dir=self.tune_cache,
                               own_rounding=self.llama.own_rounding())
        if not self.cuda_graphs:
            return
        n = min(4, self.max_slots)
        self.prefill_batch(list(range(n)), [np.ones(min(16, self.max_seq_len - 1), dtype=np.int64)] * n)
        for slot in range(n):
            self.release(slot)
        with torch.no_grad():
            mix_keys = (list(self.layout.token_buckets(self.mix_tokens))  # steps carrying prompts, every bucket
                        if self.can_mix and self.attention == "triton" else [])
            spans = {self._attn_span(1)}  # SDPA: the first length bucket (the rest on first use)
            if self.attention == "triton":
                spans.add(self._attn_span(self.max_seq_len))  # the whole cache, beside the short span
            self.graphs.capture_all(spans,
                                    self._warmup_prefill_keys() if self.prefill_graphs else (), mix_keys,
                                    self._step_body, self._prefill_body)
            self._counts.allocate()  # the draws' graphs too (the logits' type: a decode graph's)
            logits = next(iter(self.graphs.decode.values()))[1][0]
            body = packed_body(self._counts, self._last_ids, self._draw_kernel)
            self.graphs.capture_draws(body, logits.shape[1], logits.dtype)
        torch.cuda.synchronize(self.device)

    # -- Engine API ------------------------------------------------------------------------
    def _to_host(self, out: torch.Tensor, n: int) -> np.ndarray:
        if out.device.type == "cpu":
            return out[:n].float().numpy()
        host = torch.empty((n, out.shape[1]), dtype=torch.float32, pin_memory=True)
        host.copy_(out[:n], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()

    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        return self.prefill_batch([slot], [token_ids])[0]

    def prefill_batch(self, slots, prompts) -> np.ndarray:
        """All prompts in one forward: projections and MLP over the packed tokens, attention per
        prompt (varlen, or on the right-padded batch: see `Llama.attn_prompts`)."""
        return self._prefill(slots, prompts)

    def prefill_cached(self, slots, prompts, cached) -> np.ndarray:
        """`prefill_batch` of the tokens after each prompt's `cached` ones, whose KV the slot still
        holds: the same graphs (keyed by the tokens computed), each prompt's positions starting at
        its cached count, the varlen attention reading the cached keys from the slot. Not bitwise
        a full prefill (the products run on fewer rows, so cuBLAS may sum in another order)."""
        if not self.can_reuse_prefix:
            return self.prefill_batch(slots, prompts)
        full = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        first = np.asarray(cached, dtype=np.int64).reshape(-1)
        if len(first) != len(full):
            raise ValueError("prefill_cached needs one cached count per prompt")
        self._check_cached([len(p) for p in full], first.tolist())
        return self._prefill(slots, [p[c:] for p, c in zip(full, first.tolist())], first)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        if not self.can_reuse_prefix:
            return super().copy_prefix(src, dst, n)
        src, dst, n = int(src), int(dst), int(n)
        if src == dst or not (0 <= src < self.max_slots and 0 <= dst < self.max_slots) or not 0 < n < self.max_seq_len:
            raise ValueError(f"copy_prefix({src}, {dst}, {n}): two distinct slots in [0, {self.max_slots}) "
                             f"and 0 < n < {self.max_seq_len}")
        with torch.no_grad():
            for L in self.llama.layers:  # on the stream, so ordered before the step that reads them
                L.kc[dst, :, :n].copy_(L.kc[src, :, :n])
                L.vc[dst, :, :n].copy_(L.vc[src, :, :n])

    def _prefill(self, slots, prompts, first=None) -> np.ndarray:
        slots, ids, lens = self._new_prompts(slots, prompts)
        slots = slots.tolist()
        with torch.no_grad():
            if self._hf is not None:
                logits = torch.cat([self._hf.prefill(s, torch.from_numpy(p).to(self.device))
                                    for s, p in zip(slots, ids)])
            elif self.prefill_graphs and int(lens.sum()) <= self.prefill_graph_tokens:
                key = self.layout.buckets(lens)
                layout = torch.from_numpy(self.layout.build(slots, ids, lens, key, first=first))
                logits = self.graphs.run_prefill(key, self._prefill_body, layout)[: len(slots)]
            else:  # the same forward, unpadded
                key = self.layout.exact_key(lens)
                layout = torch.from_numpy(self.layout.build(slots, ids, lens, key, first=first))
                logits = self._prefill_body(layout.to(self.device, non_blocking=True), key)
            out = self._to_host(logits, len(slots))
        self._lengths[slots] = lens if first is None else lens + first
        return out

    def _argmax_banned(self, logits: torch.Tensor, ban) -> torch.Tensor:
        """Argmax of `logits` (scratch: changed in place) with `ban` applied by indexing, outside any
        graph: the HF fallback, and bans of more than BAN_IDS ids."""
        if ban is not None:
            rows = torch.from_numpy(np.asarray(ban.rows, dtype=np.int64)).to(self.device)
            cols = torch.from_numpy(np.asarray(ban.ids, dtype=np.int64)).to(self.device)
            logits[rows[:, None], cols[None, :]] = float("-inf")
        return logits.argmax(dim=-1)

    def decode_greedy(self, slots: np.ndarray, tokens: np.ndarray, ban=None) -> np.ndarray:
        """Argmax on the device: copies len(slots) ids back instead of len(slots) x vocab logits."""
        return self.decode_greedy_begin(slots, tokens, ban).result()

    def _check(self, slots: np.ndarray, tokens) -> np.ndarray:
        n = len(slots)
        if tokens is not None and len(tokens) != n:
            raise ValueError("slots and tokens differ in length")
        if n and (slots.min() < 0 or slots.max() >= self.max_slots or len(set(slots.tolist())) != n):
            raise ValueError(f"slots must be distinct and in [0, {self.max_slots})")
        pos = self._lengths[slots]
        if n and int(pos.max()) + 1 > self.max_seq_len:
            raise ValueError("a sequence reached the end of its KV cache")
        return pos

    def decode_greedy_begin(self, slots, tokens=None, ban=None, chain: "_Step | None" = None,
                            prompts=None, draws=None) -> "_Step":
        """Launch a step and return at once; `.result()` waits for this step only. Each row's token is
        its argmax, or for the rows of `draws` (`engines.base.Draws`) one drawn on the device
        (sample.py): a step with sampled rows chains and carries prompts as a greedy one does.

        `chain`: a step in flight that wrote every row's slot (a decode row or a prompt of it):
        the last ids of those slots, still on the device, are this step's input (`tokens` None), so
        the host can do the previous step's bookkeeping while this one runs. The rows may differ
        from `chain`'s (sequences that ended are left out, prompts it carried come in). A slot
        released meanwhile just gets one stray KV column past its end, which the next sequence in
        that slot overwrites before reading.

        `prompts`: (slots, token id arrays[, cached counts]) of new sequences (at most MIX_PROMPTS,
        `mix_tokens` tokens to compute in all) prefilled inside this step, whose products they
        share; their first greedy ids follow the decode rows' in `.result()`, and `ban` rows past
        len(slots) are theirs. A cached count is what `prefill_cached` takes: the slot holds the KV
        of that many first tokens of its prompt, and the step computes only the rest."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if tokens is not None:
            tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        pos = self._check(slots, tokens)
        n = len(slots)
        mix = None
        if prompts is not None and len(prompts[0]):
            mix = self._check_prompts(slots, *prompts)
        k = 0 if mix is None else len(mix[0])
        if n + k == 0:
            return _Step(np.zeros(0, dtype=np.int64), None, 0)
        if chain is not None:
            if tokens is not None:
                raise ValueError("a chained step takes its tokens from `chain`, not `tokens`")
            missing = set(slots.tolist()) - set(chain.slots.tolist())
            if missing:
                raise ValueError(f"chained rows whose slots the previous step did not write: {sorted(missing)}")
            if self._hf is not None or chain is not self._last_step:  # not the step just launched
                last = dict(zip(chain.slots.tolist(), chain.result().tolist()))
                tokens, chain = np.array([last[s] for s in slots.tolist()], dtype=np.int64), None
        if tokens is None and chain is None and n:
            raise ValueError("decode_greedy_begin needs tokens or chain")
        all_slots = slots if mix is None else np.concatenate([slots, mix[0]])
        with torch.no_grad():
            self._counts.count(slots, tokens, self._last_ids)  # before the step writes the next ids
            if self._hf is not None:
                out = self._hf.decode(slots, torch.from_numpy(np.asarray(tokens)).to(self.device))
                ids = self._argmax_banned(out, ban)
                if draws is not None:
                    d = DrawInputs(draws, draws.rows, self.device, slots[draws.rows])
                    ids.index_copy_(0, d.cols, draw(out, d, self._counts)[0])
                ids = ids.cpu()
                step = _Step(ids.numpy(), None, n, slots=slots)
            else:
                _, ids, cols = self._launch(slots, tokens, pos, chain is not None, ban, mix, draws)
                if ids.device.type == "cpu":  # a copy: `ids` may be a graph's buffer, which the next step rewrites
                    host = ids[:n].clone() if mix is None else torch.cat([ids[:n], ids[cols:cols + k]])
                    step = _Step(host.numpy(), None, n + k, slots=all_slots)
                else:  # the ids come back through one of _RING pinned buffers, taken in turn
                    r = self._ring
                    self._ring = (r + 1) % _RING
                    host = self._ids_host[r]
                    host[:n].copy_(ids[:n], non_blocking=True)
                    if k:
                        host[n:n + k].copy_(ids[cols:cols + k], non_blocking=True)
                    self._events[r].record(torch.cuda.current_stream(self.device))
                    step = _Step(host.numpy(), self._events[r], n + k, (self._ids_owner, r), all_slots)
                    self._ids_owner[r] = step
        self._last_step = step
        self._lengths[slots] = pos + 1
        if mix is not None:
            self._lengths[mix[0]] = mix[2] + mix[3]
        return step

    def _new_prompts(self, slots, prompts, busy=()):
        """(slots, id arrays, lengths) of prompts going into the empty `slots` (none of them among
        the `busy` decode rows), or ValueError."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        ids = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        if len(set(slots.tolist())) != len(slots) or len(slots) != len(ids):
            raise ValueError("a prefill needs one distinct slot per prompt")
        if set(slots.tolist()) & set(np.asarray(busy).tolist()):
            raise ValueError("prompt slots must be empty slots, not among the decode rows")
        for slot, p in zip(slots.tolist(), ids):
            if not 0 <= slot < self.max_slots:
                raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")
            if len(p) == 0:
                raise ValueError("empty prompt")
            if len(p) + 1 > self.max_seq_len:
                raise ValueError(f"prompt of {len(p)} tokens does not fit the context of {self.max_seq_len}")
        return slots, ids, np.array([len(p) for p in ids])

    def _check_cached(self, lens, cached) -> None:
        for n, c in zip(lens, cached):
            if not 0 <= c <= n - self.reuse_min_new:
                raise ValueError(f"{c} cached tokens of a {n}-token prompt (at most {n - self.reuse_min_new})")
            if n + 1 > self.max_seq_len:
                raise ValueError(f"prompt of {n} tokens does not fit the context of {self.max_seq_len}")

    def _check_prompts(self, slots, pslots, prompts, cached=None):
        """(slots, id arrays and lengths of the tokens to compute, positions of their first) of
        prompts a step may carry, or ValueError."""
        if not self.can_mix:
            raise ValueError("this engine cannot run prompts inside a decode step")
        if len(prompts) > MIX_PROMPTS:
            raise ValueError(f"a step carries at most {MIX_PROMPTS} prompts")
        pslots, ids, lens = self._new_prompts(pslots, prompts, busy=slots)
        first = np.zeros(len(ids), np.int64) if cached is None else np.asarray(cached, np.int64).reshape(-1)
        if len(first) != len(ids):
            raise ValueError("one cached count per prompt")
        if first.any():
            if not self.can_reuse_prefix:
                raise ValueError("this engine cannot reuse a cached prefix")
            self._check_cached(lens.tolist(), first.tolist())
            ids = [p[c:] for p, c in zip(ids, first.tolist())]
            lens = lens - first
        if lens.sum() > self.mix_tokens:
            raise ValueError(f"prompts of {lens.sum()} tokens: a step carries at most {self.mix_tokens}")
        return pslots, ids, lens, first

    def decode(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        pos = self._check(slots, tokens)
        n = len(slots)
        if n == 0:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        with torch.no_grad():
            self._counts.count(slots, tokens, self._last_ids)
            if self._hf is not None:
                out = self._hf.decode(slots, torch.from_numpy(tokens).to(self.device))
            else:
                out, _, _ = self._launch(slots, tokens, pos)
            self._last_step = None
            result = self._to_host(out, n)
        self._lengths[slots] = pos + 1
        return result

    def track(self, slot: int, prompt_ids) -> None:
        if not 0 <= int(slot) < self.max_slots:
            raise ValueError(f"slot {slot} out of range")
        self._counts.track(int(slot), prompt_ids)

    def release(self, slot: int) -> None:
        self._lengths[int(slot)] = 0
        self._counts.release(int(slot))
        if self._hf is not None:
            self._hf.release(int(slot))

    def length(self, slot: int) -> int:
        return int(self._lengths[int(slot)])

    def describe(self) -> dict:
        d = {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
             "path": self.path, "kernels": self.kernels, "attention": self.attention,
             "cuda_graphs": self.cuda_graphs, "pdl": self.pdl}
        if self.path == "native":
            d["weights"] = self.llama.weights
            if self.llama.mm.w8a8_rows is not None:
                d["w8a8_rows"] = self.llama.mm.w8a8_rows  # FP8 products of more rows: W8A8
            d["weight_bytes"] = self.llama.weight_bytes()
            if self.llama.weights == "dtype" and self.llama.mm.configs:  # (rows, N, K) on the kernel, not cuBLAS
                d["kernel_products"] = sorted(self.llama.mm.configs)
            if self.llama.mm.tuned_from:
                d["tuned_from"] = self.llama.mm.tuned_from  # the kernel's tuning of an earlier start
            d["graph_batch_sizes"] = self.graph_batch_sizes
            d["graphs_captured"] = sorted(self.graphs.decode, key=lambda k: (k[0], k[1] or 0))
            d["captures"] = {k: round(v, 3) for k, v in self.captures.items()}
        else:
            d["fallback_reason"] = self.blocker
        return d


class _Step:
    """A greedy decode step in flight: its ids (one per slot of `slots`) land in `host` once `done` has
    passed. `ring`: (owners, k) when `host` is the k-th of the engine's pinned buffers taken in turn:
    read after _RING later steps reused it, an error."""

    __slots__ = ("host", "done", "n", "ring", "slots")

    def __init__(self, host, done, n, ring=None, slots=None):
        self.host, self.done, self.n, self.ring = host, done, n, ring
        self.slots = np.zeros(0, np.int64) if slots is None else slots  # the slot of each id

    def result(self) -> np.ndarray:
        if self.ring is not None:
            owners, k = self.ring
            if owners[k] is not self:
                raise RuntimeError(f"decode step read after {_RING} later steps reused its buffer")
            if self.done is not None:
                self.done.synchronize()
                self.done = None
            self.host, self.ring = self.host[: self.n].copy(), None
        return self.host[: self.n]

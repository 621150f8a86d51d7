"""ONNX Runtime engine: the exported KV-cache graph run on CPU, one slot per sequence.

KV storage is one array per layer and K/V, shaped [slots, kv_heads, max_seq_len, head_dim];
a sequence of length L occupies positions [0, L) of its slot. A decode step over slots of
different lengths feeds `past = cache[slots, :, :Lmax]` with an attention mask that zeroes each
slot's unused positions [L, Lmax), and writes back only the new column (`present[:, :, Lmax]`)
into position L of each slot: sequences join and leave the batch between steps without any
re-packing, and the only per-step copy is the gather ONNX Runtime needs as a contiguous input.

Prefix reuse: a released slot keeps its KV; `prefill_cached` feeds `past = cache[slot, :, :L]` and
only the prompt's tokens after L (the exported graph takes a past of any length and several new
tokens). Its logits and KV are bitwise those of a full prefill wherever it computes 2 tokens or
more, in every precision the build writes (ONNX Runtime's CPU kernels compute each row of a matrix
product alike for any row count of 2 or more; one row takes another path whose rounding differs):
hence `reuse_min_new = 2` (tests/test_prefix_reuse.py; docs/benchmarks.md, "Prefix reuse").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..cpus import usable_cpus
from .base import Engine
from .slots import decode_layout

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


def session_options(threads: int, model_path):
    """The generator's ONNX Runtime session settings (both graphs: this module's and ort_gqa.py's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads) or default_threads(weight_bytes(model_path))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # work handed out in small blocks as threads free up, not split evenly up front: on a machine the
    # server's other processes share, a worker they preempt no longer holds up every operator
    # (docs/benchmarks.md, "The CPU engine's own graph")
    opts.add_session_config_entry("session.dynamic_block_base", "4")
    return opts


# below this many bytes of weights a decode step is too short for a second thread to pay for its
# fork/join and for the core it takes from the server's other processes
PARALLEL_MIN_WEIGHT_BYTES = 8 << 20


def default_threads(weights: int) -> int:
    """Intra-op threads when the repository says 0. Measured on 2 cores, 1 to 16 streams, same runs
    (docs/benchmarks.md, "The CPU engine's own graph"): stories260K (1 MB of weights) serves 1.2-1.7x
    more tokens/s on 1 thread than on 2; the stories15M-shaped model (98 MB fp32, 28 MB INT8) more on 2.
    So: 1 thread for a model under PARALLEL_MIN_WEIGHT_BYTES; otherwise every usable CPU where there are
    up to 4, half of them beyond (Triton, the pre/postprocessing models and often the clients need the rest)."""
    cores = usable_cpus()  # the pod's CPU limit, not the node's cores (cpus.py)
    if weights < PARALLEL_MIN_WEIGHT_BYTES:
        return 1
    return cores if cores <= 4 else cores // 2


def weight_bytes(model_path) -> int:
    """The graph file and its external data, in bytes (0 where absent)."""
    path = Path(model_path)
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())


class OrtSlots(Engine):
    """What both ONNX Runtime engines share: the graph's KV spec and session, one cache array per layer
    and K/V shaped [slots, kv_heads, max_seq_len, head_dim], and each slot's length and the valid KV a
    released slot keeps for prefix reuse. `OrtEngine` (this module) and `ort_gqa.OrtGqaEngine`."""

    can_reuse_prefix = True
    reuse_min_new = 2  # one new token: another kernel path, whose rounding differs (module docstring)

    def __init__(self, model_path: str | os.PathLike, max_slots: int, max_seq_len: int,
                 threads: int = 0, providers: list[str] | None = None, **_unused):
        import onnxruntime as ort

        model_path = Path(model_path)
        self.spec = json.loads((model_path.parent / "kv_spec.json").read_text())
        self.num_layers = self.spec["num_layers"]
        self.num_kv_heads = self.spec["num_kv_heads"]
        self.head_dim = self.spec["head_dim"]
        self.vocab_size = self.spec["vocab_size"]
        self.max_slots = int(max_slots)
        self.max_seq_len = int(max_seq_len)
        self.session = ort.InferenceSession(str(model_path), session_options(threads, model_path),
                                            providers=providers or ["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_dtype = _NP_DTYPES.get(inputs["past_key_values.0.key"].type, np.float32)
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        shape = (self.max_slots, self.num_kv_heads, self.max_seq_len, self.head_dim)
        # np.zeros maps pages lazily: memory is touched only as sequences grow
        self.cache = [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]
        self.lengths = np.zeros(self.max_slots, dtype=np.int64)
        # positions of each released slot whose KV is still valid (prefix reuse)
        self.kept = np.zeros(self.max_slots, dtype=np.int64)

    def _valid(self, slot: int) -> int:
        """Positions of `slot` whose KV is valid: its sequence's, or what a released one left."""
        return int(self.lengths[slot] or self.kept[slot])

    def _check_prompt(self, slot: int, n: int, cached: int) -> None:
        """Refuse a prompt of `n` tokens that does not fit, or `cached` tokens `slot` cannot reuse."""
        if n + 1 > self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens does not fit the context of {self.max_seq_len}")
        valid = self._valid(slot)  # a prefill retried after a failed batch: its own
        if cached and not cached <= min(valid, n - self.reuse_min_new):
            raise ValueError(f"slot {slot} cannot reuse {cached} cached tokens for a prompt of {n} "
                             f"(valid: {valid}, at least {self.reuse_min_new} must be computed)")

    def _check_copy(self, src: int, dst: int, n: int) -> None:
        if self.lengths[dst] or n > self._valid(src) or src == dst:
            raise ValueError(f"cannot copy {n} positions of slot {src} (valid: {self._valid(src)}) into slot {dst}")

    def release(self, slot: int) -> None:
        self.kept[slot] = self.lengths[slot]
        self.lengths[slot] = 0

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def describe(self) -> dict:
        return {**super().describe(), "kv_dtype": np.dtype(self.kv_dtype).name,
                "providers": self.session.get_providers()}


class OrtEngine(OrtSlots):
    """The TorchScript export: past KV gathered in, past + new out (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_names = ["logits"] + self.present_names

    # -- Engine API ------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        return self._prefill(int(slot), token_ids, 0)

    def prefill_cached(self, slots, prompts, cached) -> np.ndarray:
        return np.stack([self._prefill(int(s), p, int(c)) for s, p, c in zip(slots, prompts, cached)])

    def _prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        """Run `token_ids[start:]` into `slot` on top of the KV of `token_ids[:start]` it holds."""
        n = len(token_ids)
        self._check_prompt(slot, n, start)
        feeds = {
            "input_ids": np.asarray(token_ids[start:], dtype=np.int64)[None, :],
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(start, n, dtype=np.int64)[None, :],
        }
        for name, store in zip(self.past_names, self.cache):
            feeds[name] = store[slot:slot + 1, :, :start]
        logits, *present = self.session.run(self.output_names, feeds)
        for store, new in zip(self.cache, present):
            store[slot, :, start:n] = new[0, :, start:n]  # present = past + the new tokens' KV
        self.lengths[slot] = n
        return logits[0, -1].astype(np.float32, copy=False)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self._check_copy(src, dst, n)
        for store in self.cache:
            store[dst, :, :n] = store[src, :, :n]
        self.kept[dst] = n

    def decode(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        lengths = self.lengths[slots]
        top, mask = decode_layout(lengths, self.max_seq_len)
        b = len(slots)
        feeds = {
            "input_ids": np.asarray(tokens, dtype=np.int64).reshape(b, 1),
            "attention_mask": mask,
            "position_ids": lengths.reshape(b, 1),
        }
        contiguous = bool(np.all(np.diff(slots) == 1))
        for name, store in zip(self.past_names, self.cache):
            feeds[name] = store[slots[0]:slots[0] + b, :, :top] if contiguous else store[slots, :, :top]
        logits, *present = self.session.run(self.output_names, feeds)
        rows = np.arange(b)
        for store, new in zip(self.cache, present):
            # new column for every sequence sits at index `top`; it belongs at index `length`
            store[slots, :, lengths] = new[rows, :, top]
        self.lengths[slots] = lengths + 1
        return logits[:, -1].astype(np.float32, copy=False)

    def logits_all(self, token_ids) -> np.ndarray:
        """Logits [n, vocab] of every position of `token_ids` run as a fresh sequence (parity and the
        accuracy gate); the cache is not touched."""
        ids = np.asarray(token_ids, dtype=np.int64)
        n = len(ids)
        empty = np.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None], **{p: empty for p in self.past_names}}
        return self.session.run(["logits"], feeds)[0][0].astype(np.float32, copy=False)

"""TensorRT engine: the KV-cache plan run on the GPU, one slot per sequence.

Same slot semantics as `OrtEngine` (see engines/ort.py): the cache is one torch CUDA tensor per
layer and K/V, [slots, kv_heads, max_seq_len, head_dim] in the plan's KV dtype; a decode step
gathers `cache[slots, :, :Lmax]` as the past input, masks each slot's unused positions with the
attention mask, and scatters only the new column back into position L of each slot. All device work
(the gather, the TensorRT enqueue, the scatter, the logits copy) is ordered on one torch stream.

One execution context per optimization profile of the plan (build/tensorrt.py makes `prefill` and
`decode`); each call uses the first profile whose shape ranges hold its shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .base import Engine
from .slots import decode_layout


class TensorRTEngineError(RuntimeError):
    pass


def _import():
    try:
        import tensorrt as trt
    except Exception as exc:
        raise TensorRTEngineError(
            f"tensorrt not importable: {exc}. The tensorrt engine needs TensorRT's Python package and "
            "an NVIDIA GPU; rebuild the repository with --engine onnxruntime to serve on CPU.") from exc
    import torch

    if not torch.cuda.is_available():
        raise TensorRTEngineError("the tensorrt engine needs a CUDA GPU visible to torch")
    return trt, torch


class TrtEngine(Engine):
    def __init__(self, model_path: str | os.PathLike, max_slots: int, max_seq_len: int, device: str = "cuda:0",
                 **_unused):
        trt, torch = _import()
        self.trt, self.torch = trt, torch
        plan = Path(model_path)
        spec = json.loads((plan.parent / "kv_spec.json").read_text())
        meta_path = plan.with_name(plan.name + ".json")
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        built_with = self.meta.get("tensorrt_version")
        if built_with and built_with != trt.__version__:
            raise TensorRTEngineError(f"{plan} was built with TensorRT {built_with}, this is {trt.__version__}: "
                                        "plans are not portable across versions, rebuild it")
        self.num_layers = int(spec["num_layers"])
        self.num_kv_heads = int(spec["num_kv_heads"])
        self.head_dim = int(spec["head_dim"])
        self.vocab_size = int(spec["vocab_size"])
        self.max_slots = int(max_slots)
        self.max_seq_len = int(max_seq_len)
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise TensorRTEngineError(f"TensorRT could not deserialize {plan} (built for another GPU?)")
        self.stream = torch.cuda.Stream(device=self.device)
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = {"input_ids", "logits", *self.past_names, *self.present_names} - set(io)
        if missing:
            raise TensorRTEngineError(f"{plan} lacks tensors {sorted(missing)[:4]}")
        self.inputs = [n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in io}
        self.kv_dtype = self.dtypes["past_key_values.0.key"]

        # one context per profile, with the (min, max) of batch / seq / past it accepts
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, self.stream.cuda_stream)
            lo_ids, _, hi_ids = self.engine.get_tensor_profile_shape("input_ids", p)
            lo_kv, _, hi_kv = self.engine.get_tensor_profile_shape("past_key_values.0.key", p)
            ranges = {"batch": (lo_ids[0], hi_ids[0]), "seq": (lo_ids[1], hi_ids[1]), "past": (lo_kv[2], hi_kv[2])}
            self.contexts.append((ctx, ranges))
        self.stream.synchronize()

        shape = (self.max_slots, self.num_kv_heads, self.max_seq_len, self.head_dim)
        with torch.cuda.device(self.device):
            self.cache = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.past_names]
            # a valid address for zero-sized tensors (the empty past of a prefill)
            self._placeholder = torch.zeros(1, dtype=self.kv_dtype, device=self.device)
        self.lengths = np.zeros(self.max_slots, dtype=np.int64)

    def _torch_dtype(self, dt):
        trt, torch = self.trt, self.torch
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                 trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
        for name, tdt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("INT8", torch.int8)):
            if hasattr(trt.DataType, name):
                table[getattr(trt.DataType, name)] = tdt
        if dt not in table:
            raise TensorRTEngineError(f"unsupported TensorRT I/O type {dt}")
        return table[dt]

    def _context(self, batch: int, seq: int, past: int):
        for ctx, r in self.contexts:
            if r["batch"][0] <= batch <= r["batch"][1] and r["seq"][0] <= seq <= r["seq"][1] \
                    and r["past"][0] <= past <= r["past"][1]:
                return ctx
        raise ValueError(f"no optimization profile of the plan holds batch {batch}, seq {seq}, past {past}; "
                         f"profiles: {[r for _, r in self.contexts]}")

    def _run(self, feeds: dict) -> dict:
        """Enqueue one step on self.stream; `feeds` maps input names to CUDA tensors."""
        torch = self.torch
        ids = feeds["input_ids"]
        ctx = self._context(ids.shape[0], ids.shape[1], feeds["past_key_values.0.key"].shape[2])
        for name in self.inputs:
            t = feeds[name]
            if t.dtype != self.dtypes[name]:
                t = feeds[name] = t.to(self.dtypes[name])
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"shape {tuple(t.shape)} refused for {name}")
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._placeholder.data_ptr())
        outputs = {}
        for name in ["logits", *self.present_names]:
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTEngineError("execute_async_v3 failed")
        outputs["_feeds"] = feeds  # keep the inputs alive until the stream has used them
        return outputs

    def _tensor(self, a, dtype):
        return self.torch.as_tensor(np.ascontiguousarray(a), dtype=dtype).to(self.device, non_blocking=False)

    # -- Engine API ------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        torch = self.torch
        n = len(token_ids)
        if n + 1 > self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens does not fit the context of {self.max_seq_len}")
        with torch.cuda.stream(self.stream):
            empty = torch.empty((1, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype, device=self.device)
            feeds = {"input_ids": self._tensor(np.asarray(token_ids, np.int64)[None], torch.int64),
                     "attention_mask": torch.ones((1, n), dtype=torch.int64, device=self.device),
                     "position_ids": torch.arange(n, dtype=torch.int64, device=self.device)[None],
                     **{name: empty for name in self.past_names}}
            out = self._run(feeds)
            for store, name in zip(self.cache, self.present_names):
                store[slot, :, :n] = out[name][0]
            logits = out["logits"][0, -1].float().cpu().numpy()  # waits for the stream
        self.lengths[slot] = n
        return logits

    def decode(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return self._decode(slots, tokens, greedy=False)

    def decode_greedy(self, slots: np.ndarray, tokens: np.ndarray, ban=None) -> np.ndarray:
        """Argmax on the GPU: only the token ids cross PCIe."""
        return self._decode(slots, tokens, greedy=True, ban=ban)

    def _decode(self, slots: np.ndarray, tokens: np.ndarray, greedy: bool, ban=None) -> np.ndarray:
        torch = self.torch
        slots = np.asarray(slots, dtype=np.int64)
        lengths = self.lengths[slots]
        top, mask = decode_layout(lengths, self.max_seq_len)
        b = len(slots)
        with torch.cuda.stream(self.stream):
            slot_t = self._tensor(slots, torch.int64)
            len_t = self._tensor(lengths, torch.int64)
            feeds = {"input_ids": self._tensor(np.asarray(tokens, np.int64).reshape(b, 1), torch.int64),
                     "attention_mask": self._tensor(mask, torch.int64),
                     "position_ids": len_t.reshape(b, 1)}
            contiguous = bool(np.all(np.diff(slots) == 1))
            for name, store in zip(self.past_names, self.cache):
                # TensorRT wants dense inputs: gather the slots' first `top` positions
                feeds[name] = (store[slots[0]:slots[0] + b, :, :top].contiguous() if contiguous
                               else store[:, :, :top].index_select(0, slot_t))
            out = self._run(feeds)
            rows = torch.arange(b, device=self.device)
            for store, name in zip(self.cache, self.present_names):
                # the new column of every sequence sits at index `top`; it belongs at index `length`
                store[slot_t, :, len_t] = out[name][rows, :, top]
            last = out["logits"][:, -1]
            if greedy and ban is not None:
                last = last.clone()
                last[self._tensor(ban.rows, torch.int64)[:, None], self._tensor(ban.ids, torch.int64)[None, :]] = float("-inf")
            result = last.argmax(-1).cpu().numpy() if greedy else last.float().cpu().numpy()  # waits for the stream
        self.lengths[slots] = lengths + 1
        return result

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def describe(self) -> dict:
        return {**super().describe(), "kv_dtype": str(self.kv_dtype).replace("torch.", ""),
                "tensorrt": self.trt.__version__, "gpu": self.torch.cuda.get_device_name(self.device),
                "precision": self.meta.get("precision"), "profiles": len(self.contexts)}

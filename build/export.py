"""Export a Hugging Face causal LM to one ONNX graph with a KV cache.

The graph serves both prefill (past length 0) and decode (past length > 0):

    inputs   input_ids       int64 [batch, seq]
             attention_mask  int64 [batch, past + seq]   1 = attend, 0 = masked (holes allowed)
             position_ids    int64 [batch, seq]
             past_key_values.{i}.key / .value   float [batch, kv_heads, past, head_dim]
    outputs  logits          float [batch, seq, vocab]
             present.{i}.key / .value           float [batch, kv_heads, past + seq, head_dim]

This is the layout Optimum and ONNX Runtime GenAI use for decoder-only models, so the graph
also compiles with TensorRT's ONNX parser. The attention mask may have holes (zeros between
ones): the generator keeps each sequence in a fixed slot of a shared cache and masks the
unused positions, which is what makes continuous batching possible without re-packing.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx_files import EXTERNAL_DATA_THRESHOLD, save_onnx


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """Shape facts about the model's KV cache, read from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int

    @classmethod
    def from_config(cls, config) -> "KVSpec":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = getattr(text, "num_attention_heads", None) or text.n_head
        hidden = getattr(text, "hidden_size", None) or text.n_embd
        head_dim = getattr(text, "head_dim", None) or hidden // n_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or n_heads
        layers = getattr(text, "num_hidden_layers", None) or text.n_layer
        max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", 2048)
        return cls(int(layers), int(kv_heads), int(head_dim), int(text.vocab_size), int(max_pos))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


class KVCacheWrapper(nn.Module):
    """Flat-tensor forward around a transformers model (ONNX has no Cache objects)."""

    def __init__(self, model: nn.Module, spec: KVSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.spec.num_layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def load_model(model_id: str, dtype: torch.dtype = torch.float32, attn: str = "eager"):
    """Load a causal LM from a local folder or a hub id, in eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, attn_implementation=attn)
    model.eval()
    return model


def dummy_inputs(spec: KVSpec, batch: int = 2, seq: int = 3, past: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    kv = [
        torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=g).to(dtype)
        for _ in range(2 * spec.num_layers)
    ]
    return (ids, mask, pos, *kv)


def export_onnx(model: nn.Module, out_path: Path, opset: int = 18) -> KVSpec:
    """Export `model` to `out_path` (weights in one external-data file beside it)."""
    spec = KVSpec.from_config(model.config)
    wrapper = KVCacheWrapper(model, spec).eval()
    args = dummy_inputs(spec, dtype=next(model.parameters()).dtype)
    input_names = ["input_ids", "attention_mask", "position_ids", *spec.past_names()]
    output_names = ["logits", *spec.present_names()]
    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    for n in spec.past_names():
        dyn[n] = {0: "batch", 2: "past"}
    for n in spec.present_names():
        dyn[n] = {0: "batch", 2: "total"}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(out_path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    _consolidate_external_data(out_path)
    return spec


def _consolidate_external_data(path: Path, threshold_bytes: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Rewrite the ONNX file with its weights in one `<name>.data` file (or inline if small).

    Beyond 2 GB the TorchScript exporter writes one file per initializer next to the model,
    named after the tensor (`model.layers.0.mlp.up_proj.weight`, `onnx__MatMul_123`, ...). The
    files to remove afterwards are exactly the external-data locations the exported graph
    names; nothing else in the folder is touched.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model

    model = onnx.load(str(path), load_external_data=False)
    data_name = path.name + ".data"
    written = set()
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            written |= {e.value for e in t.external_data if e.key == "location"}
    load_external_data_for_model(model, str(path.parent))
    save_onnx(model, path, threshold_bytes)
    root = path.parent.resolve()
    for loc in written - {data_name}:
        f = (path.parent / loc).resolve()
        if f.parent == root and f.is_file() and f != path.resolve():
            f.unlink()


def write_spec(spec: KVSpec, path: Path, **extra) -> None:
    path.write_text(json.dumps({**spec.to_json(), **extra}, indent=2))


def torch_logits(model: nn.Module, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(input_ids)).logits.float().numpy()

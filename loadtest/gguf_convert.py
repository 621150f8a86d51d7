"""A minimal Hugging Face Llama -> GGUF (F32) converter, for the llama.cpp peer of `tritonchat bench`.

    tritonchat gguf-convert MODEL_DIR OUT.gguf

llama.cpp's own ``convert_hf_to_gguf.py`` lives in the llama.cpp source tree (not in any wheel), so
this writes the same layout with the ``gguf`` package (PyPI, maintained by llama.cpp): the ``llama``
architecture's metadata, the SentencePiece-style vocabulary (``tokenizer.ggml.model = llama``) and
F32 tensors under llama.cpp's names. The one non-obvious step is the one llama.cpp's converter does
too: Hugging Face stores q/k projections permuted for its half-split RoPE; llama.cpp's ``llama``
RoPE rotates adjacent pairs, so the rows of q_proj/k_proj are permuted back.

Vocabulary: from ``tokenizer.model`` (SentencePiece, exact pieces, scores and types) when the folder
has one; otherwise from ``tokenizer.json`` (a BPE converted from SentencePiece, as the Llama-2
tokenizer): score = -(rank of the first merge producing the piece), which makes llama.cpp's
best-score-first bigram merging follow the BPE merge order.

Only Llama-architecture models (Llama 2 style: RMSNorm, SwiGLU, RoPE, optional GQA, no biases).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class ConvertError(RuntimeError):
    pass


def _permute(w, n_head: int):
    """HF (half-split RoPE) row order -> llama.cpp (interleaved pairs), per head (llama.cpp's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _vocab_from_sentencepiece(path: Path) -> Tuple[List[bytes], List[float], List[int]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(TOKEN_UNKNOWN)
        elif sp.IsControl(i):
            types.append(TOKEN_CONTROL)
        elif sp.IsUnused(i):
            types.append(TOKEN_UNUSED)
        elif sp.IsByte(i):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    return tokens, scores, types


def _vocab_from_tokenizer_json(path: Path, vocab_size: int) -> Tuple[List[bytes], List[float], List[int]]:
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: only a BPE tokenizer.json (converted from SentencePiece) is supported")
    vocab = model["vocab"]
    id_to_tok = {i: t for t, i in vocab.items()}
    rank = {}
    for r, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    specials = {t["id"]: t["content"] for t in data.get("added_tokens") or []}
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        t = id_to_tok.get(i, specials.get(i, f"[PAD{i}]"))
        tokens.append(t.encode("utf-8"))
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if t == unk:
            types.append(TOKEN_UNKNOWN)
        elif i in specials:
            types.append(TOKEN_CONTROL)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(TOKEN_BYTE)
        elif i not in id_to_tok:
            types.append(TOKEN_UNUSED)
        else:
            types.append(TOKEN_NORMAL)
    return tokens, scores, types


def convert(model_dir: Path, out: Path, tokenizer_model: Optional[Path] = None) -> Path:
    import gguf
    import torch
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ConvertError(f"only llama models are converted here, not {cfg.get('model_type')!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConvertError("llama with attention/MLP biases is not supported by this converter")
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    if (rope.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        raise ConvertError("RoPE scaling is not supported by this converter")
    vocab_size = cfg["vocab_size"]

    spm_path = tokenizer_model or (model_dir / "tokenizer.model")
    if Path(spm_path).is_file():
        tokens, scores, types = _vocab_from_sentencepiece(Path(spm_path))
    elif (model_dir / "tokenizer.json").is_file():
        tokens, scores, types = _vocab_from_tokenizer_json(model_dir / "tokenizer.json", vocab_size)
    else:
        raise ConvertError(f"{model_dir} has neither tokenizer.model nor tokenizer.json")
    if len(tokens) != vocab_size:
        raise ConvertError(f"tokenizer has {len(tokens)} tokens, the model's vocabulary {vocab_size}")
    tok_cfg = {}
    if (model_dir / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    gen_cfg = {}
    if (model_dir / "generation_config.json").is_file():
        gen_cfg = json.loads((model_dir / "generation_config.json").read_text())

    def tid(name: str, default: Optional[int]) -> Optional[int]:
        v = gen_cfg.get(f"{name}_token_id", cfg.get(f"{name}_token_id"))
        if isinstance(v, list):
            v = v[0] if v else None
        return default if v is None else int(v)

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"no *.safetensors in {model_dir}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(rope_theta)
    w.add_vocab_size(vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for name, default in (("bos", 1), ("eos", 2)):
        v = tid(name, default)
        if v is not None:
            getattr(w, f"add_{name}_token_id")(v)
    unk = [i for i, t in enumerate(types) if t == TOKEN_UNKNOWN]
    if unk:
        w.add_unk_token_id(unk[0])
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", True)))
    w.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(layers):
        for k, v in per_layer.items():
            names[f"model.layers.{i}.{k}"] = f"blk.{i}.{v}"
    unknown = [k for k in state if k not in names and "rotary_emb" not in k]
    if unknown:
        raise ConvertError(f"unexpected tensors: {unknown[:5]}")
    for hf_name, gg_name in names.items():
        if hf_name not in state:
            if hf_name == "lm_head.weight":
                continue  # tied: llama.cpp uses token_embd
            raise ConvertError(f"missing tensor {hf_name}")
        t = state[hf_name].to(torch.float32)
        if hf_name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _permute(t, kv_heads)
        w.add_tensor(gg_name, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run_convert(model_dir: Path, out: Path, tokenizer_model: Optional[Path] = None) -> int:
    """`tritonchat gguf-convert`: print the GGUF's path; the exit status."""
    try:
        print(convert(model_dir, out, tokenizer_model))
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

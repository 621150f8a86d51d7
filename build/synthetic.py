"""Seeded random-init causal LMs paired with real tokenizers, for tests and benchmarks.

`make_random_model("llama", out_dir, tokenizer="llama2", layers=22, hidden=2048, heads=32,
kv_heads=4, intermediate=5632)` writes a folder that `AutoModelForCausalLM` and `AutoTokenizer`
load like any Hugging Face checkpoint: `config.json` + `model.safetensors`, `tokenizer.json` +
`tokenizer_config.json`, and a `generation_config.json` carrying the tokenizer's EOS id. The
weights are random (so the text is gibberish) but every shape, name and code path is the real
architecture's, and the same seed always gives the same bytes. From the shell:
`tritonchat synthetic-model --arch llama --tokenizer llama2 --out DIR [--layers N ...]`.

Architectures: ``gpt2`` (absolute positions, Conv1D, tied embeddings), ``llama`` (RoPE, GQA,
RMSNorm, SwiGLU) and ``qwen2`` (Llama plus q/k/v biases, and a ChatML chat template).

Tokenizers (read from the shared folder, never copied into the repository):
``gpt2`` — GPT-2 byte-level BPE from ``tokenizers/gpt2/{vocab.json,merges.txt}`` (50,257 tokens,
EOS = BOS = ``<|endoftext|>`` 50256); ``llama2`` — the Llama-2 SentencePiece model from
``tokenizers/llama2/tokenizer.model`` (32,000 tokens, byte fallback; BOS 1, EOS 2, UNK 0).

The Llama-2 tokenizer is converted with the ``sentencepiece`` library itself (vocab and piece
scores, merges ordered by score as the Hugging Face converter does), not through
``transformers``' protobuf path, which needs a protobuf runtime at least as new as the one
``sentencepiece``'s generated code was built with. The result encodes like SentencePiece except
for the Hugging Face ``legacy=False`` rule on a leading space (the same tokenizer layout the
transformers-5 ``LlamaTokenizer`` and ``shared/models/stories260K`` use).

Initialisation: Hugging Face's default (std 0.02 everywhere) gives near-uniform logits, so
greedy decoding of a random model collapses to one token and argmax ties make engine parity
flaky. Here (standard deviations) every matrix is 1/sqrt(fan_in) so activations stay O(1) at
any width, biases 0.1 so bias export is actually exercised, norm weights N(1, 0.1); untied
models get embeddings of std 1 and an LM head of std 2/sqrt(hidden) (logits of std ~2: peaked
enough that greedy outputs are stable against float error, far from fp16 overflow). Tied models
(GPT-2; Llama with tie_embeddings=True) get embeddings of std 1/sqrt(hidden), so the logits have
std ~1 and a token's own embedding does not dominate the next prediction; GPT-2's MLP output
projection is mean-centred so the GELU's positive mean adds no constant direction. Random tied
models still fall into short cycles (a few distinct tokens per 20), untied ones rarely repeat.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

ARCHS = ("gpt2", "llama", "qwen2")
TOKENIZERS = ("gpt2", "llama2")

# the ChatML markers Qwen's instruct models use
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# canonical shape names -> default values (tiny: tests run in seconds)
DEFAULT_SHAPE = {
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "kv_heads": None,       # llama/qwen2 (GPT-2 has no GQA). None: 2 (GQA) at the default 4 heads,
                            # = heads (MHA, as HF and stories15M) when heads is given
    "intermediate": None,   # None: 4*hidden for gpt2, ~8/3*hidden (rounded to 32) for llama/qwen2
    "vocab": None,          # None: the tokenizer's size (len(tokenizer))
    "max_positions": 512,
    "head_dim": None,       # None: hidden // heads
    "tie_embeddings": None, # None: True for gpt2 (always tied), False for llama/qwen2
    "rope_theta": 10000.0,
}
_ALIASES = {
    "num_layers": "layers", "n_layer": "layers", "num_hidden_layers": "layers",
    "hidden_size": "hidden", "n_embd": "hidden", "d_model": "hidden",
    "num_heads": "heads", "n_head": "heads", "num_attention_heads": "heads",
    "num_kv_heads": "kv_heads", "num_key_value_heads": "kv_heads",
    "intermediate_size": "intermediate", "ffn": "intermediate", "n_inner": "intermediate",
    "vocab_size": "vocab",
    "max_position_embeddings": "max_positions", "n_positions": "max_positions", "context": "max_positions",
    "tie_word_embeddings": "tie_embeddings",
}


def shared_dir() -> Path:
    """The shared data folder: $TRITONCHAT_SHARED, else `shared/` beside the repository."""
    env = os.environ.get("TRITONCHAT_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared"


def tokenizer_files(name: str, shared: Path | None = None) -> list[Path]:
    """The shared files tokenizer `name` is built from (they may be missing)."""
    root = Path(shared) if shared is not None else shared_dir()
    if name == "gpt2":
        return [root / "tokenizers/gpt2/vocab.json", root / "tokenizers/gpt2/merges.txt"]
    if name == "llama2":
        return [root / "tokenizers/llama2/tokenizer.model"]
    raise ValueError(f"unknown tokenizer {name!r} (expected one of {TOKENIZERS})")


# -- tokenizers ------------------------------------------------------------------------------

def load_tokenizer(name: str, shared: Path | None = None, model_max_length: int | None = None,
                   arch: str | None = None):
    """Build the real GPT-2 or Llama-2 tokenizer (a transformers fast tokenizer) from shared files.

    With `arch="qwen2"` the GPT-2 vocabulary is wrapped in transformers' `Qwen2Tokenizer` (Qwen's
    pre-tokenizer regex and NFC, EOS = PAD = `<|endoftext|>`, no BOS): transformers 5 loads the
    tokenizer of every qwen2 checkpoint with that class whatever `tokenizer_config.json` says,
    so this is what `AutoTokenizer` will give back from the folder. For the same reason the
    SentencePiece tokenizer cannot be paired with qwen2.
    """
    files = tokenizer_files(name, shared)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer {name!r} needs {', '.join(missing)} (set TRITONCHAT_SHARED)")
    extra = {"model_max_length": model_max_length} if model_max_length else {}
    if name == "gpt2":
        vocab = json.loads(files[0].read_text(encoding="utf-8"))
        merges = []
        for line in files[1].read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#version"):
                a, b = line.split(" ")
                merges.append((a, b))
        if arch == "qwen2":
            from transformers import Qwen2TokenizerFast

            return Qwen2TokenizerFast(vocab=vocab, merges=merges, **extra)
        from transformers import GPT2TokenizerFast

        return GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 add_prefix_space=False, **extra)
    if arch == "qwen2":
        raise ValueError("transformers 5 loads a qwen2 checkpoint's tokenizer as the byte-level "
                         "Qwen2Tokenizer, which cannot hold the Llama-2 SentencePiece tokenizer: "
                         "use tokenizer='gpt2' with arch='qwen2'")
    # llama2: SentencePiece BPE -> tokenizers BPE with byte fallback
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(files[0]))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}
    special = {sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    merges = generate_merges(vocab, scores, skip_tokens=special)
    return LlamaTokenizerFast(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()),
                              bos_token=sp.id_to_piece(sp.bos_id()), eos_token=sp.id_to_piece(sp.eos_id()),
                              add_bos_token=True, add_eos_token=False, legacy=False, **extra)


# -- configs ---------------------------------------------------------------------------------

def _normalise_shape(shape: dict) -> tuple[dict, dict]:
    """Split `shape` into canonical shape keys and raw config overrides (anything unknown)."""
    out, raw = dict(DEFAULT_SHAPE), {}
    for k, v in shape.items():
        key = _ALIASES.get(k, k)
        if key in DEFAULT_SHAPE:
            out[key] = v
        else:
            raw[k] = v
    return out, raw


def make_config(arch: str, vocab_size: int, *, bos_token_id=None, eos_token_id=None, **shape):
    """The transformers config for `arch` with canonical shape names (see DEFAULT_SHAPE)."""
    s, raw = _normalise_shape(shape)
    layers, hidden, heads = int(s["layers"]), int(s["hidden"]), int(s["heads"])
    if hidden % heads and s["head_dim"] is None:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}: give head_dim")
    vocab = int(s["vocab"] or vocab_size)
    if arch == "gpt2":
        from transformers import GPT2Config

        if s["head_dim"] not in (None, hidden // heads):
            raise ValueError("gpt2 has head_dim = hidden // heads")
        if s["tie_embeddings"] is False:
            raise ValueError("gpt2 always ties its embeddings")
        return GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab,
                          n_positions=int(s["max_positions"]), n_inner=s["intermediate"],
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=bos_token_id, eos_token_id=eos_token_id, **raw)
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown arch {arch!r} (expected one of {ARCHS})")
    heads_given = any(_ALIASES.get(k, k) == "heads" for k in shape)
    kv = int(s["kv_heads"] or (heads if heads_given else min(2, heads)))
    if heads % kv:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv}")
    inter = s["intermediate"] or 32 * math.ceil(8 * hidden / 3 / 32)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, intermediate_size=int(inter), vocab_size=vocab,
                  max_position_embeddings=int(s["max_positions"]),
                  tie_word_embeddings=bool(s["tie_embeddings"]),
                  rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if s["head_dim"] is not None:
        common["head_dim"] = int(s["head_dim"])
    common.update(raw)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Qwen2Config

    return Qwen2Config(**common)


# -- weights ---------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Re-initialise every parameter from one seeded generator (see the module docstring)."""
    g = torch.Generator().manual_seed(int(seed))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is model.get_input_embeddings().weight
    # tied: logits = norm(h) . E, so E's scale is the logit scale (std ~1 with 1/sqrt(hidden))
    embed_std = 1.0 / math.sqrt(hidden) if tied else 1.0
    done: set[int] = set()

    def fill(p: torch.Tensor, mean: float, std: float) -> None:
        if id(p) in done:
            return
        done.add(id(p))
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).add_(mean).to(p.dtype))

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if module is lm_head and not tied:
            fill(module.weight, 0.0, 2.0 / math.sqrt(hidden))
        elif isinstance(module, nn.Embedding):
            fill(module.weight, 0.0, embed_std)
        elif isinstance(module, nn.Linear):
            fill(module.weight, 0.0, 1.0 / math.sqrt(module.in_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight [in, out]
            fill(module.weight, 0.0, 1.0 / math.sqrt(module.weight.shape[0]))
            if name.endswith("mlp.c_proj"):
                # GELU outputs have a positive mean: centre the projection so it adds no
                # constant direction to every position (which makes greedy text collapse)
                module.weight.sub_(module.weight.mean(0, keepdim=True))
        elif isinstance(weight, nn.Parameter) and weight.dim() == 1:  # LayerNorm / RMSNorm
            fill(weight, 1.0, 0.1)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            fill(bias, 0.0, 0.1)
    leftover = [n for n, p in model.named_parameters() if id(p) not in done]
    if leftover:
        raise RuntimeError(f"init_weights left parameters untouched: {leftover[:5]}")


# -- the whole folder --------------------------------------------------------------------------

def make_random_model(arch: str, out_dir, *, tokenizer: str, seed: int = 0,
                      dtype: torch.dtype | str = torch.float32, shared: Path | None = None,
                      **shape) -> Path:
    """Write a seeded random-init `arch` causal LM and the real `tokenizer` to `out_dir`.

    `shape` takes canonical names (layers, hidden, heads, kv_heads, intermediate, vocab,
    max_positions, head_dim, tie_embeddings, rope_theta), their transformers spellings
    (num_hidden_layers, n_embd, ...), or any other config field, passed through unchanged.
    Returns `out_dir` as a Path.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (expected one of {ARCHS})")
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    s, _ = _normalise_shape(shape)
    tok = load_tokenizer(tokenizer, shared, model_max_length=int(s["max_positions"]), arch=arch)
    eos_ids = [tok.eos_token_id]
    if arch == "qwen2":
        # ChatML markers as special tokens; the model's vocabulary grows to cover them
        tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        tok.chat_template = CHATML_TEMPLATE
        eos_ids.append(tok.convert_tokens_to_ids(IM_END))
    if s["vocab"] is not None and int(s["vocab"]) < len(tok):
        raise ValueError(f"vocab {s['vocab']} is smaller than the tokenizer ({len(tok)} tokens)")

    config = make_config(arch, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **shape)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    torch.manual_seed(int(seed))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_weights(model, seed)
    model = model.to(dtype).eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    gen = GenerationConfig(bos_token_id=tok.bos_token_id,
                           eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    gen.save_pretrained(out)
    _check_tokenizer_roundtrip(tok, out)
    return out


_PROBE = "Hello, world!  It's 2024:\tnaïve café 😀 你好\n\nOnce upon a time"


def _check_tokenizer_roundtrip(tok, out: Path) -> None:
    """AutoTokenizer must give back from `out` the tokenizer that was written."""
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(out)
    a, b = tok(_PROBE).input_ids, back(_PROBE).input_ids
    if len(back) != len(tok) or a != b or back.eos_token_id != tok.eos_token_id:
        raise RuntimeError(f"{out}: AutoTokenizer loads {type(back).__name__} ({len(back)} tokens), which "
                           f"encodes differently from the {type(tok).__name__} written ({len(tok)} tokens)")


def describe(out: Path) -> str:
    """One line about a written model folder (`tritonchat synthetic-model` prints it)."""
    out = Path(out)
    cfg = json.loads((out / "config.json").read_text())
    n = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return f"wrote {out} ({cfg['model_type']}, vocab {cfg['vocab_size']}, {n / 2**20:.1f} MiB of weights)"

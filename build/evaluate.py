"""Accuracy gate for a (quantized) generator graph against an FP32 reference.

Three figures, each for the graph under test and for the reference:

* perplexity on held-out text, in sliding windows inside the model's context (window W, stride
  W/2: every token is scored once, with at least W/2 tokens of context after the first window),
  and on the same windows the mean KL divergence of the next-token distributions from the
  reference's (perplexity can move either way by chance; KL only grows with the damage);
* greedy agreement over `new_tokens` generated tokens on a prompt set: the fraction of tokens
  generated before the first divergence (`prefix_agreement`) and the position-wise fraction of
  identical tokens (`token_agreement`). The graph under test generates through `OrtEngine`
  (prefill into slots, batched decode with the holes mask), exactly as the server runs it;
* artifact size on disk (graph + external data).

`gate(report, precision)` raises `AccuracyGateError` when the perplexity increase exceeds the
bound for the precision, a relative increase (default fp16 0.005 = +0.5 %, int8 0.02 = +2 %).

The reference is an FP32 PyTorch model (a Hugging Face folder or hub id, or a loaded module) or an
FP32 ONNX graph (a `model.onnx` path, or a model repository whose `generator/1/model.onnx` is one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .onnx_files import artifact_size
from .precision import graph_precision, normalize_precision
from .text import bos_id, builtin_sample, encode

# max relative perplexity increase over the reference (0.02 = +2 %), as in the build config's accuracy_bounds
DEFAULT_BOUNDS = {"fp32": 0.001, "fp16": 0.005, "int8": 0.02, "int8-weight-only": 0.02, "fp8": 0.01}
DEFAULT_PROMPTS = (
    "Once upon a time, there was a little",
    "The dog ran to the park and",
    "One day, Lily found a big box in her room.",
    "Tom and his mom went to the store to buy",
)


class AccuracyGateError(RuntimeError):
    def __init__(self, message: str, report: "EvalReport", bound: float):
        super().__init__(message)
        self.report = report
        self.bound = bound  # relative perplexity increase allowed (0.02 = +2 %)


@dataclasses.dataclass
class EvalReport:
    onnx_path: str
    precision: str | None
    size_bytes: int
    perplexity: float
    eval_tokens: int
    window: int
    stride: int
    reference: str | None = None
    reference_size_bytes: int | None = None
    reference_perplexity: float | None = None
    kl_divergence: float | None = None         # mean KL(reference || model) of next-token distributions, nats
    prefix_agreement: float | None = None      # tokens before the first divergence / tokens generated
    token_agreement: float | None = None       # position-wise identical tokens / tokens generated
    first_divergence: list[int] | None = None  # per prompt: index of the first differing token (= new_tokens if none)
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def ppl_delta_pct(self) -> float | None:
        if self.reference_perplexity is None:
            return None
        return 100.0 * (self.perplexity / self.reference_perplexity - 1.0)

    @property
    def size_ratio(self) -> float | None:
        if not self.reference_size_bytes:
            return None
        return self.size_bytes / self.reference_size_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ppl_delta_pct"] = self.ppl_delta_pct
        d["size_ratio"] = self.size_ratio
        return d

    def summary(self) -> str:
        parts = [f"perplexity {self.perplexity:.4f}"]
        if self.reference_perplexity is not None:
            parts[0] += f" vs {self.reference_perplexity:.4f} FP32 reference ({self.ppl_delta_pct:+.2f} %)"
        if self.kl_divergence is not None:
            parts.append(f"KL {self.kl_divergence:.4f} nats/token")
        if self.token_agreement is not None:
            parts.append(f"greedy agreement {self.prefix_agreement:.3f} before first divergence, "
                         f"{self.token_agreement:.3f} position-wise ({self.prompts} prompts x {self.new_tokens} tokens)")
        parts.append(f"size {self.size_bytes / 1e6:.1f} MB" +
                     (f" ({self.size_ratio:.2f}x reference)" if self.size_ratio else ""))
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# models behind one small interface: logits of a window, greedy continuation of prompts
# ----------------------------------------------------------------------------------------------
class _OnnxModel:
    """An exported KV-cache graph, run through the generator's own `OrtEngine` (one session)."""

    def __init__(self, onnx_path: Path, threads: int = 0):
        self.path = Path(onnx_path)
        self.spec = json.loads((self.path.parent / "kv_spec.json").read_text())
        self.threads = threads
        self._ex = None

    def _engine(self, slots: int = 1):
        """The engine, with at least `slots` KV slots of the whole context (KV memory is mapped lazily)."""
        from tritonchat.python_backend.cpus import usable_cpus
        from tritonchat.python_backend.engines import open_ort_engine

        if self._ex is None or self._ex.max_slots < slots:
            # threads 0 here: every CPU this process may use, as the server's on up to 4
            self._ex = open_ort_engine(self.path, max_slots=slots, max_seq_len=self.max_context,
                                   threads=self.threads or usable_cpus())
        return self._ex

    @property
    def max_context(self) -> int:
        return int(self.spec.get("max_position_embeddings") or 2048)

    def describe(self) -> str:
        return str(self.path)

    def size(self) -> int:
        return artifact_size(self.path)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self._engine().logits_all(ids)

    def greedy(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        """All prompts at once through OrtEngine: one slot each, batched decode (holes mask)."""
        ex = self._engine(len(prompts))
        for s in range(len(prompts)):
            ex.release(s)
        last = np.array([int(np.argmax(ex.prefill(s, np.asarray(p, np.int64)))) for s, p in enumerate(prompts)])
        out = [[int(t)] for t in last]
        slots = np.arange(len(prompts))
        for _ in range(new_tokens - 1):
            last = ex.decode(slots, last).argmax(-1)
            for o, t in zip(out, last):
                o.append(int(t))
        return out


class _torch_threads:
    """Run torch with `n` intra-op threads inside the block (0: leave as is). A tiny model on a
    busy machine runs several times faster on one thread than on oversubscribed cores."""

    def __init__(self, n: int):
        self.n = int(n or 0)

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)


class _TorchModel:
    def __init__(self, model, name: str, size: int | None):
        self.model = model
        self.name = name
        self._size = size
        self.threads = 0

    @classmethod
    def load(cls, ref):
        import torch

        if isinstance(ref, torch.nn.Module):
            size = sum(p.numel() * p.element_size() for p in ref.parameters())
            return cls(ref.eval(), type(ref).__name__, size)
        from .export import load_model

        model = load_model(str(ref), dtype=torch.float32)
        p = Path(str(ref))
        size = sum(f.stat().st_size for f in p.glob("*.safetensors")) or sum(
            f.stat().st_size for f in p.glob("*.bin")) if p.is_dir() else None
        return cls(model, str(ref), size or sum(t.numel() * t.element_size() for t in model.parameters()))

    @property
    def max_context(self) -> int:
        from .export import KVSpec

        return KVSpec.from_config(self.model.config).max_position_embeddings

    def describe(self) -> str:
        return f"{self.name} (PyTorch {str(self.device_dtype()[1]).replace('torch.', '')})"

    def device_dtype(self):
        p = next(self.model.parameters())
        return p.device, p.dtype

    def size(self) -> int | None:
        return self._size

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        dev = self.device_dtype()[0]
        with torch.no_grad(), _torch_threads(self.threads):
            ids = torch.as_tensor(ids[None], dtype=torch.long, device=dev)
            return self.model(input_ids=ids).logits[0].float().cpu().numpy()

    def greedy(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        import torch

        outs = []
        dev = self.device_dtype()[0]
        with torch.no_grad(), _torch_threads(self.threads):
            for p in prompts:
                o = self.model(input_ids=torch.as_tensor([list(p)], dtype=torch.long, device=dev), use_cache=True)
                toks = [int(o.logits[0, -1].argmax())]
                past = o.past_key_values
                for _ in range(new_tokens - 1):
                    o = self.model(input_ids=torch.tensor([[toks[-1]]], device=dev), past_key_values=past,
                                   use_cache=True)
                    past = o.past_key_values
                    toks.append(int(o.logits[0, -1].argmax()))
                outs.append(toks)
        return outs


def _as_model(ref, threads: int = 0):
    if ref is None:
        return None
    if isinstance(ref, _TorchModel):
        ref.threads = threads
        return ref
    if isinstance(ref, _OnnxModel):
        return ref
    if isinstance(ref, (str, os.PathLike)):
        p = Path(ref)
        if p.suffix == ".onnx" and p.is_file():
            return _OnnxModel(p, threads)
        if p.is_dir() and (p / "generator" / "1" / "model.onnx").is_file():  # a model repository
            return _OnnxModel(p / "generator" / "1" / "model.onnx", threads)
        if p.is_dir() and (p / "model.onnx").is_file() and not (p / "config.json").is_file():
            return _OnnxModel(p / "model.onnx", threads)
    model = _TorchModel.load(ref)
    model.threads = threads
    return model


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) windows over [0, n): each target position 1..n-1 scored once."""
    out, prev_end = [], 1
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def perplexity(model, ids: np.ndarray, window: int, stride: int, reference=None) -> tuple[float, float | None, float | None]:
    """(perplexity of `model`, perplexity of `reference`, mean KL(reference || model) of the
    next-token distributions), over the same sliding windows; the last two None without reference."""
    nll, ref_nll, kl, count = 0.0, 0.0, 0.0, 0
    for begin, end, first in sliding_windows(len(ids), window, stride):
        window_ids = ids[begin:end]
        sl = slice(first - begin - 1, end - begin - 1)  # logits[i] predicts ids[begin + i + 1]
        tgt = ids[first:end]
        lp = _log_softmax(model.logits(window_ids)[sl])
        nll -= float(lp[np.arange(len(tgt)), tgt].sum())
        if reference is not None:
            rp = _log_softmax(reference.logits(window_ids)[sl])
            ref_nll -= float(rp[np.arange(len(tgt)), tgt].sum())
            kl += float((np.exp(rp) * (rp - lp)).sum())
        count += len(tgt)
    count = max(count, 1)
    if reference is None:
        return float(np.exp(nll / count)), None, None
    return float(np.exp(nll / count)), float(np.exp(ref_nll / count)), kl / count


def agreement(reference: Sequence[Sequence[int]], test: Sequence[Sequence[int]]) -> tuple[float, float, list[int]]:
    prefix, same, total, first = 0, 0, 0, []
    for r, t in zip(reference, test):
        n = min(len(r), len(t))
        eq = [a == b for a, b in zip(r[:n], t[:n])]
        k = eq.index(False) if False in eq else n
        first.append(k)
        prefix += k
        same += sum(eq)
        total += n
    return prefix / max(total, 1), same / max(total, 1), first


def evaluate(reference_model_dir_or_model, onnx_path: Path, *, text: str | None = None,
             prompts: Sequence[str] | None = None, new_tokens: int = 64, tokenizer=None,
             window: int | None = None, stride: int | None = None, max_eval_tokens: int = 4096,
             precision: str | None = None, threads: int = 0) -> EvalReport:
    """Measure `onnx_path` (a KV-cache graph with kv_spec.json beside it) against the reference.

    `reference_model_dir_or_model`: HF folder / hub id / torch module / FP32 ONNX path / model
    repository, or None for absolute figures only. `text`: held-out text for perplexity (None:
    the held-out part of the built-in sample). `window`: perplexity window (default: the model's
    context, at most 512); `stride` default window // 2. At most `max_eval_tokens` are scored.
    `threads`: intra-op threads for ONNX Runtime and the PyTorch reference (0: their defaults).
    """
    t0 = time.perf_counter()
    if tokenizer is None:
        raise ValueError("evaluate needs the model's tokenizer")
    test = _OnnxModel(Path(onnx_path), threads)
    ref = _as_model(reference_model_dir_or_model, threads)
    if precision is None:
        precision = test.spec.get("precision") or graph_precision(test.path)
    return _evaluate(ref, test, str(onnx_path), precision, t0, text=text, prompts=prompts, new_tokens=new_tokens,
                     tokenizer=tokenizer, window=window, stride=stride, max_eval_tokens=max_eval_tokens)


def evaluate_torch_weights(model, precision: str, *, tokenizer, device: str = "cpu", text: str | None = None,
                           prompts: Sequence[str] | None = None, new_tokens: int = 64,
                           max_eval_tokens: int = 4096, activations: bool = False) -> EvalReport:
    """The torch engine's 8-bit weights (`--precision int8-weight-only` or `fp8`) against the model in
    its own dtype: the same model with every product's weight rounded through the format
    (python_backend/engines/torch/quant.py, `fake_quantize`), which is what the engine's products
    compute with, up to the order of the sums; `activations` (FP8, W8A8): every product's input rows
    rounded too, as the engine's products of many rows do on Hopper. Both run on `device`;
    `size_bytes` is what the engine keeps (8-bit products, their scales, the embedding and norms in
    the dtype)."""
    import copy

    import torch

    from tritonchat.python_backend.engines import TORCH_WEIGHTS
    from tritonchat.python_backend.engines.torch.quant import fake_quantize

    t0 = time.perf_counter()
    ref_module = model.to(device).eval()
    test_module = copy.deepcopy(ref_module)
    # W8A8: every product's rows rounded, where the engine rounds only those of more than W8A8_ROWS
    # rows (prompts, steps of many streams): the gate judges the larger of the two errors
    fake_quantize(test_module, TORCH_WEIGHTS[precision], activations=activations)
    embed = ref_module.get_input_embeddings().weight
    linear = [p for n, p in ref_module.named_parameters() if p.dim() == 2 and p is not embed]
    head = ref_module.get_output_embeddings().weight
    size = sum(p.numel() + p.shape[0] * 4 for p in linear) + embed.numel() * embed.element_size() \
        + (head.numel() + head.shape[0] * 4 if head is embed else 0) \
        + sum(p.numel() * p.element_size() for p in ref_module.parameters() if p.dim() == 1)
    ref = _TorchModel(ref_module, "reference", sum(p.numel() * p.element_size() for p in ref_module.parameters()))
    what = f"{precision} weights" + (" and activations" if activations else "")
    test = _TorchModel(test_module, what, int(size))
    try:
        return _evaluate(ref, test, f"torch engine, {what}", precision, t0, text=text, prompts=prompts,
                         new_tokens=new_tokens, tokenizer=tokenizer, window=None, stride=None,
                         max_eval_tokens=max_eval_tokens)
    finally:
        del test_module
        if device != "cpu":
            torch.cuda.empty_cache()


def _evaluate(ref, test, label: str, precision: str, t0: float, *, text, prompts, new_tokens, tokenizer,
              window, stride, max_eval_tokens) -> EvalReport:
    text = text if text is not None else default_eval_text()
    ids = encode(tokenizer, text)
    bos = bos_id(tokenizer)
    ids = np.asarray(([bos] if bos is not None else []) + ids[:max_eval_tokens], dtype=np.int64)
    if len(ids) < 2:
        raise ValueError("evaluation text is too short")
    ctx = min(test.max_context, ref.max_context if ref is not None else test.max_context)
    window = int(min(window or 512, ctx))
    stride = int(stride or max(1, window // 2))

    ppl, ref_ppl, kl = perplexity(test, ids, window, stride, ref)
    report = EvalReport(onnx_path=label, precision=precision, size_bytes=test.size(),
                        perplexity=ppl, eval_tokens=len(ids) - 1, window=window, stride=stride,
                        reference_perplexity=ref_ppl, kl_divergence=kl)
    if ref is not None:
        report.reference = ref.describe()
        report.reference_size_bytes = ref.size()

    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if prompts and new_tokens > 0 and ref is not None:
        prompt_ids = [([bos] if bos is not None else []) + encode(tokenizer, p) for p in prompts]
        limit = ctx - new_tokens - 1
        prompt_ids = [p[-limit:] for p in prompt_ids]
        got = test.greedy(prompt_ids, new_tokens)
        want = ref.greedy(prompt_ids, new_tokens)
        report.prefix_agreement, report.token_agreement, report.first_divergence = agreement(want, got)
        report.prompts, report.new_tokens = len(prompts), new_tokens
    report.seconds = time.perf_counter() - t0
    return report


def gate(report: EvalReport, precision: str | None = None,
         bounds: Mapping[str, float] | float | None = None) -> None:
    """Raise AccuracyGateError when the perplexity increase over the reference exceeds the bound
    for `precision`, a relative increase (0.02 = +2 %). `bounds`: one number, or a mapping
    precision -> bound merged over DEFAULT_BOUNDS (the build config's `accuracy_bounds`).
    A precision without a bound passes; a perplexity decrease passes."""

    precision = normalize_precision(precision or report.precision or "fp32")
    if isinstance(bounds, (int, float)):
        bound = float(bounds)
    else:
        bound = {**DEFAULT_BOUNDS, **(dict(bounds) if bounds else {})}.get(precision)
    if bound is None:
        return
    if report.reference_perplexity is None:
        raise ValueError("the accuracy gate needs a report with reference figures (evaluate with a reference)")
    delta = report.ppl_delta_pct
    bound_pct = 100.0 * float(bound)
    if not np.isfinite(report.perplexity) or delta > bound_pct:
        raise AccuracyGateError(
            f"{precision} accuracy gate failed: perplexity {report.perplexity:.4f} vs "
            f"{report.reference_perplexity:.4f} for the reference ({delta:+.2f} %, bound {bound_pct:+.2f} %)"
            + (f"; KL {report.kl_divergence:.4f} nats/token" if report.kl_divergence is not None else "")
            + (f"; greedy agreement {report.prefix_agreement:.3f} before first divergence, "
               f"{report.token_agreement:.3f} position-wise" if report.token_agreement is not None else "")
            + f" [{report.eval_tokens} tokens scored, {report.onnx_path}]",
            report, float(bound))


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def report_table(report: EvalReport, title: str | None = None):
    from rich.table import Table

    t = Table(title=title or f"Accuracy: {report.precision or '?'} vs FP32 reference")
    t.add_column("figure")
    t.add_column("model", justify="right")
    t.add_column("reference", justify="right")
    t.add_column("change", justify="right")
    ref_ppl = report.reference_perplexity
    t.add_row(f"perplexity ({report.eval_tokens} tokens, window {report.window})", f"{report.perplexity:.4f}",
              f"{ref_ppl:.4f}" if ref_ppl is not None else "-",
              f"{report.ppl_delta_pct:+.2f} %" if ref_ppl is not None else "-")
    if report.kl_divergence is not None:
        t.add_row("KL(reference || model), nats/token", f"{report.kl_divergence:.4f}", "0", "")
    if report.token_agreement is not None:
        t.add_row(f"greedy prefix agreement ({report.prompts} x {report.new_tokens} tokens)",
                  f"{report.prefix_agreement:.3f}", "1.000", "")
        t.add_row("greedy position-wise agreement", f"{report.token_agreement:.3f}", "1.000", "")
    t.add_row("size on disk", f"{report.size_bytes / 1e6:.2f} MB",
              f"{report.reference_size_bytes / 1e6:.2f} MB" if report.reference_size_bytes else "-",
              f"{report.size_ratio:.2f}x" if report.size_ratio else "-")
    t.caption = f"{report.onnx_path} vs {report.reference or 'no reference'}  ({report.seconds:.1f} s)"
    return t


def render_report(report: EvalReport, console=None, title: str | None = None):
    """Print the report's table on `console` (a new rich Console when None) and return the table."""
    from rich.console import Console

    table = report_table(report, title)
    (console or Console()).print(table)
    return table


def default_eval_text() -> str:
    """The held-out part of the built-in sample (never used for INT8 calibration)."""
    return builtin_sample("heldout")


# ----------------------------------------------------------------------------------------------
# a generated repository
# ----------------------------------------------------------------------------------------------
def eval_repository(repo_dir: Path, text_path: Path | None = None, reference=None, *,
                    prompts: Sequence[str] | None = None, new_tokens: int = 64, threads: int = 0) -> EvalReport:
    """Evaluate the generator of a model repository: REPO/generator/1/model.onnx (+ kv_spec.json),
    tokenizer from REPO/preprocessing/1/tokenizer/. `reference`: HF folder / hub id / FP32 ONNX /
    FP32 repository; None: REPO/generator/1/hf/ when present, else absolute figures only."""
    from transformers import AutoTokenizer

    repo_dir = Path(repo_dir)
    onnx_path = repo_dir / "generator" / "1" / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no generator graph at {onnx_path}")
    tok_dir = repo_dir / "preprocessing" / "1" / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"no tokenizer at {tok_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if reference is None and (repo_dir / "generator" / "1" / "hf" / "config.json").is_file():
        reference = repo_dir / "generator" / "1" / "hf"
    text = Path(text_path).read_text(encoding="utf-8") if text_path else None
    return evaluate(reference, onnx_path, text=text, prompts=prompts, new_tokens=new_tokens,
                    tokenizer=tokenizer, threads=threads)

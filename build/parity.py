"""Numerical parity of an exported ONNX graph against the PyTorch model it came from.

`check_parity` drives the graph through `OrtEngine`, the serving path itself, not a
re-implementation of it, and compares logits with a plain (cache-free) transformers forward of
the same token sequence:

* ``prefill`` per prompt: the logits of every prompt position (the graph run with past length 0);
* ``decode`` steps: all prompts sit in non-adjacent slots of one engine and advance together,
  one token per step, so a step is a batch of sequences of different lengths read through the
  "holes" attention mask (zeros between a short sequence's end and the batch's longest past).
  The tokens fed are the reference's own argmax, so both sides always see the same sequence.

A check passes when ``max|Δ| <= atol + rtol * max|reference logits|``. The fp32 defaults
(atol 1e-3, rtol 1e-4) follow from float32's unit roundoff (6e-8): reordered dot products and
fused kernels move logits by far less than atol (the figures measured: docs/build-config.md,
``parity_tolerance``), while the bugs this guards against (a wrong mask, a position or cache
offset, a dropped bias) move them by a sizeable fraction of the logit spread (>= 0.1). The relative term keeps the check fair for models with large logits.
Half-precision graphs get atol 2e-2, rtol 1e-2 (fp16's roundoff is 5e-4 per operation).

`check_greedy` runs greedy generation through the engine with sequences joining and leaving
shared slots at staggered steps, and compares the tokens with transformers' `generate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_PROMPTS = (
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog, and then it",
)

_DEFAULT_TOL = {  # dtype -> (atol, rtol)
    torch.float32: (1e-3, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (5e-2, 2e-2),
}


class ParityError(AssertionError):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance; `.report` has the figures."""

    def __init__(self, report: "ParityReport"):
        self.report = report
        bad = [r for r in report.rows if not r.ok]
        lines = [f"{r.check}: max|Δ| {r.max_abs_diff:.3g} > allowed {r.allowed:.3g} "
                 f"(max|logit| {r.ref_scale:.3g}, argmax {'same' if r.argmax_match else 'DIFFERS'})"
                 for r in bad]
        super().__init__(f"ONNX/PyTorch parity failed in {len(bad)} of {len(report.rows)} checks "
                         f"(atol {report.atol:g}, rtol {report.rtol:g}):\n  " + "\n  ".join(lines))


@dataclasses.dataclass
class ParityRow:
    check: str              # e.g. "prefill p0", "decode 1 (slots 1,3)"
    tokens: str             # what was compared, e.g. "7 positions" or "2 seqs, lengths 5,9"
    max_abs_diff: float
    ref_scale: float        # max |reference logit| in this check
    allowed: float          # atol + rtol * ref_scale
    argmax_match: bool      # greedy choice identical at every compared position

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.allowed)


@dataclasses.dataclass
class ParityReport:
    rows: list[ParityRow]
    atol: float
    rtol: float
    onnx_path: str = ""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max((r.max_abs_diff for r in self.rows), default=0.0)

    def raise_for_status(self) -> "ParityReport":
        if not self.ok:
            raise ParityError(self)
        return self

    def table(self, title: str | None = None):
        """A `rich.table.Table` of the checks."""
        from rich.table import Table

        t = Table(title=title or f"ONNX Runtime vs PyTorch logits ({Path(self.onnx_path).name})")
        for col, just in (("check", "left"), ("compared", "left"), ("max |Δ|", "right"),
                          ("max |logit|", "right"), ("allowed", "right"), ("argmax", "center"),
                          ("ok", "center")):
            t.add_column(col, justify=just)
        for r in self.rows:
            t.add_row(r.check, r.tokens, f"{r.max_abs_diff:.2e}", f"{r.ref_scale:.3g}", f"{r.allowed:.2e}",
                      "same" if r.argmax_match else "[red]differs[/red]",
                      "[green]yes[/green]" if r.ok else "[red]NO[/red]")
        return t

    def __str__(self) -> str:
        lines = [f"parity {'ok' if self.ok else 'FAILED'}: max|Δ| {self.max_abs_diff:.3g} "
                 f"(atol {self.atol:g}, rtol {self.rtol:g})"]
        lines += [f"  {'ok ' if r.ok else 'BAD'} {r.check:<28} {r.tokens:<28} max|Δ| {r.max_abs_diff:.2e} "
                  f"allowed {r.allowed:.2e}" for r in self.rows]
        return "\n".join(lines)


# -- helpers ---------------------------------------------------------------------------------

def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for logits computed in `dtype` (see the module docstring)."""
    return _DEFAULT_TOL.get(dtype, _DEFAULT_TOL[torch.float16])


def _as_model(model):
    if isinstance(model, (str, Path)):
        from .export import load_model

        return load_model(str(model))
    return model.eval()


def _as_tokenizer(tokenizer, model):
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer or model.name_or_path))
    return tokenizer


def encode_prompts(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Token ids of each prompt (strings are encoded with the tokenizer's special tokens)."""
    out = []
    for p in prompts:
        ids = list(tokenizer(p)["input_ids"]) if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {p!r} encodes to no tokens")
        out.append(ids)
    return out


@torch.no_grad()
def reference_logits(model, ids: Sequence[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of a plain cache-free forward, as float32 numpy."""
    x = torch.as_tensor([list(ids)], dtype=torch.long, device=model.device)
    return model(input_ids=x, use_cache=False).logits[0].float().cpu().numpy()


def _engine(onnx_path, max_slots: int, max_seq_len: int, threads: int = 0):
    from ..python_backend.engines import open_ort_engine

    onnx_path = Path(onnx_path)
    if not (onnx_path.parent / "kv_spec.json").is_file():
        raise FileNotFoundError(f"{onnx_path.parent / 'kv_spec.json'} is missing (export.write_spec writes it)")
    return open_ort_engine(onnx_path, max_slots=max_slots, max_seq_len=max_seq_len, threads=threads)


def _row(check: str, tokens: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> ParityRow:
    if got.shape != ref.shape:
        raise ValueError(f"{check}: ONNX logits {got.shape} vs PyTorch {ref.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    if not np.isfinite(diff):
        diff = float("inf")
    scale = float(np.max(np.abs(ref)))
    same = bool(np.array_equal(got.argmax(-1), ref.argmax(-1)))
    return ParityRow(check, tokens, diff, scale, atol + rtol * scale, same)


# -- the checks ------------------------------------------------------------------------------

def check_parity(model, onnx_path, tokenizer=None, prompts: Sequence = DEFAULT_PROMPTS,
                 tolerance: float | None = None, *, rtol: float | None = None, decode_steps: int = 2,
                 threads: int = 0, raise_on_error: bool = True) -> ParityReport:
    """Compare ONNX Runtime logits with PyTorch logits for `prompts` (see the module docstring).

    `model`: the transformers model (or its folder); `onnx_path`: the exported `model.onnx` with
    `kv_spec.json` beside it; `tokenizer`: a tokenizer, a folder, or None (the model's folder);
    `prompts`: strings or lists of token ids, two or more of different lengths to exercise the
    holes mask. `tolerance` is the absolute part (atol) and `rtol` the part relative to the
    largest reference logit; both default by the model's dtype. Raises `ParityError` when a
    check is out of tolerance (unless `raise_on_error=False`).
    """
    model = _as_model(model)
    tok = _as_tokenizer(tokenizer, model) if any(isinstance(p, str) for p in prompts) else None
    ids = encode_prompts(tok, prompts)
    d_atol, d_rtol = default_tolerance(next(model.parameters()).dtype)
    atol = d_atol if tolerance is None else float(tolerance)
    rtol = d_rtol if rtol is None else float(rtol)

    n = len(ids)
    slots = [2 * i + 1 for i in range(n)]  # non-adjacent: the engine gathers, not slices
    ex = _engine(onnx_path, max_slots=2 * n + 1, max_seq_len=max(map(len, ids)) + decode_steps + 1,
                   threads=threads)
    rows: list[ParityRow] = []
    seqs = [list(x) for x in ids]
    refs = [reference_logits(model, x) for x in seqs]

    for i, (slot, x, ref) in enumerate(zip(slots, seqs, refs)):
        # every prompt position: the graph itself at past length 0 ...
        full = ex.logits_all(x)
        rows.append(_row(f"prefill p{i}", f"{len(x)} positions", full, ref, atol, rtol))
        # ... and the engine's prefill into its slot (last position)
        last = ex.prefill(slot, np.asarray(x, dtype=np.int64))
        rows.append(_row(f"prefill p{i} -> slot {slot}", "last position", last, ref[-1], atol, rtol))

    for step in range(1, decode_steps + 1):
        nxt = [int(r[-1].argmax()) for r in refs]
        lengths = [len(s) for s in seqs]
        got = ex.decode(np.asarray(slots), np.asarray(nxt))
        for s, t in zip(seqs, nxt):
            s.append(t)
        refs = [reference_logits(model, s) for s in seqs]
        ref_last = np.stack([r[-1] for r in refs])
        rows.append(_row(f"decode {step} (slots {','.join(map(str, slots))})",
                         f"{n} seqs, past {','.join(map(str, lengths))}", got, ref_last, atol, rtol))

    report = ParityReport(rows, atol, rtol, str(onnx_path))
    if raise_on_error:
        report.raise_for_status()
    return report


@dataclasses.dataclass
class GreedyResult:
    prompts: list[list[int]]
    ort: list[list[int]]            # new tokens from the engine
    hf: list[list[int]]             # new tokens from transformers' generate
    schedule: list[str]             # what the scheduler did, step by step (for failure messages)

    @property
    def ok(self) -> bool:
        return self.ort == self.hf

    def mismatches(self) -> list[str]:
        out = []
        for i, (a, b) in enumerate(zip(self.ort, self.hf)):
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                out.append(f"prompt {i}: first difference at new token {k}: ort {a[k:k + 5]} vs transformers {b[k:k + 5]}")
        return out


def greedy_ort(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids=(),
               join_every: int = 1) -> tuple[list[list[int]], list[str]]:
    """Greedy decoding of `prompts` through `engine` with continuous batching.

    Sequences wait in a queue; every `join_every` steps, one waiting sequence is prefilled into
    the lowest free slot (so they join at staggered steps), then every running sequence decodes
    one token in one batched call. A sequence leaves (its slot is released and reused) on an
    EOS id or after `max_new_tokens` tokens. Returns the new tokens per prompt and a log.
    """
    eos = set(int(e) for e in eos_ids)
    waiting = list(range(len(prompts)))
    free = list(range(engine.max_slots))
    running: dict[int, int] = {}       # slot -> prompt index
    out: list[list[int]] = [[] for _ in prompts]
    pending: dict[int, int] = {}       # slot -> token to feed next
    log: list[str] = []
    step = 0

    def finish(slot: int, i: int) -> None:
        engine.release(slot)
        del running[slot]
        pending.pop(slot, None)
        free.append(slot)
        free.sort()

    while waiting or running:
        if waiting and free and step % join_every == 0:
            i, slot = waiting.pop(0), free.pop(0)
            logits = engine.prefill(slot, np.asarray(prompts[i], dtype=np.int64))
            t = int(np.argmax(logits))
            out[i].append(t)
            running[slot] = i
            log.append(f"step {step}: prompt {i} -> slot {slot} (prefill {len(prompts[i])}) -> {t}")
            if t in eos or len(out[i]) >= max_new_tokens:
                finish(slot, i)
            else:
                pending[slot] = t
        if pending:
            slots = sorted(pending)
            logits = engine.decode(np.asarray(slots), np.asarray([pending[s] for s in slots]))
            log.append(f"step {step}: decode slots {slots}")
            for s, row in zip(slots, logits):
                i = running[s]
                t = int(np.argmax(row))
                out[i].append(t)
                if t in eos or len(out[i]) >= max_new_tokens:
                    finish(s, i)
                else:
                    pending[s] = t
        step += 1
    return out, log


@torch.no_grad()
def greedy_torch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids=()) -> list[list[int]]:
    """transformers' `generate(do_sample=False)`, one prompt at a time (no padding)."""
    from transformers import GenerationConfig

    eos = [int(e) for e in eos_ids]
    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=int(max_new_tokens),
                           eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
    res = []
    for p in prompts:
        x = torch.as_tensor([list(p)], dtype=torch.long, device=model.device)
        g = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
        res.append(g[0, x.shape[1]:].tolist())
    return res


def model_eos_ids(model) -> list[int]:
    """The EOS ids of the model's generation config (an int or a list there)."""
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None)
    if e is None:
        e = getattr(model.config, "eos_token_id", None)
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, (list, tuple)) else [e])]


def check_greedy(model, onnx_path, tokenizer=None, prompts: Sequence = DEFAULT_PROMPTS, *,
                 max_new_tokens: int = 16, max_slots: int = 2, join_every: int = 3,
                 eos_ids: Sequence[int] | None = None, threads: int = 0,
                 raise_on_error: bool = True) -> GreedyResult:
    """Greedy tokens through `OrtEngine` (staggered joins, shared slots) vs `generate`.

    With fewer slots than prompts, later prompts wait for a slot to be released and reuse it.
    Raises AssertionError naming the first differing positions on a mismatch.
    """
    model = _as_model(model)
    tok = _as_tokenizer(tokenizer, model) if any(isinstance(p, str) for p in prompts) else None
    ids = encode_prompts(tok, prompts)
    eos = model_eos_ids(model) if eos_ids is None else [int(e) for e in eos_ids]
    ex = _engine(onnx_path, max_slots=max_slots, max_seq_len=max(map(len, ids)) + max_new_tokens + 1,
                   threads=threads)
    ort_out, log = greedy_ort(ex, ids, max_new_tokens, eos, join_every=join_every)
    ref = greedy_torch(model, ids, max_new_tokens, eos)
    res = GreedyResult(ids, ort_out, ref, log)
    if raise_on_error and not res.ok:
        raise AssertionError("greedy ONNX Runtime tokens differ from transformers generate:\n  "
                             + "\n  ".join(res.mismatches()))
    return res

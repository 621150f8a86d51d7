"""Accuracy gate: perplexity, KL, greedy agreement and size against the FP32 PyTorch model."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, STORIES_MODEL as MODEL

TEXT = SHARED / "data" / "tinystories_sample.txt"

pytestmark = pytest.mark.skipif(not (MODEL.exists() and TEXT.exists()), reason="shared model or data missing")


@pytest.fixture(scope="session")
def reference():
    from tritonchat.build.evaluate import _TorchModel

    return _TorchModel.load(str(MODEL))


@pytest.fixture(scope="session")
def reports(graphs, tokenizer, reference):  # noqa: F811
    from tritonchat.build.evaluate import evaluate

    text = TEXT.read_text(encoding="utf-8")
    return {p: evaluate(reference, path, text=text, tokenizer=tokenizer, new_tokens=64, threads=1)
            for p, path in graphs.items()}


def test_fp32_graph_matches_pytorch_exactly(reports):
    r = reports["fp32"]
    assert r.eval_tokens > 1000 and r.window == 512 and r.stride == 256
    assert abs(r.ppl_delta_pct) < 0.01 and r.kl_divergence < 1e-6
    assert r.prefix_agreement == r.token_agreement == 1.0
    assert r.prompts == 4 and r.new_tokens == 64 and r.first_divergence == [64] * 4


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-weight-only"])
def test_gate_passes_within_default_bounds_on_shared_data(reports, precision):
    from tritonchat.build.evaluate import gate

    r = reports[precision]
    assert r.precision == precision
    gate(r, precision)  # default bounds: fp16 0.005 (+0.5 %), int8 0.02 (+2 %)
    assert np.isfinite(r.perplexity) and 1.0 < r.perplexity < 20.0
    assert 0.0 <= r.prefix_agreement <= r.token_agreement <= 1.0
    assert r.kl_divergence < (0.001 if precision in ("fp32", "fp16") else 0.1)
    if precision != "fp32":
        assert r.size_bytes < reports["fp32"].size_bytes


def test_gate_fails_with_impossible_bounds_and_names_the_figures(reports):
    from tritonchat.build.evaluate import AccuracyGateError, gate

    r = reports["int8"]
    with pytest.raises(AccuracyGateError) as err:
        gate(r, "int8", bounds={"int8": -0.5})
    msg = str(err.value)
    assert "int8 accuracy gate failed" in msg
    assert f"{r.perplexity:.4f}" in msg and f"{r.reference_perplexity:.4f}" in msg
    assert f"{r.ppl_delta_pct:+.2f} %" in msg and "bound -50.00 %" in msg and "KL" in msg
    assert "greedy agreement" in msg
    assert err.value.report is r and err.value.bound == -0.5
    with pytest.raises(AccuracyGateError):
        gate(reports["fp16"], bounds=-0.5)  # one number for any precision


def test_gate_needs_reference_figures(graphs, tokenizer):  # noqa: F811
    from tritonchat.build.evaluate import evaluate, gate

    r = evaluate(None, graphs["int8"], text=TEXT.read_text(), tokenizer=tokenizer, threads=1)
    assert r.reference_perplexity is None and r.token_agreement is None and r.kl_divergence is None
    with pytest.raises(ValueError, match="reference"):
        gate(r)


def test_report_table_renders(reports):
    from rich.console import Console

    from tritonchat.build.evaluate import render_report

    buf = io.StringIO()
    table = render_report(reports["int8"], console=Console(file=buf, width=160))
    assert table.row_count == 5
    out = buf.getvalue()
    for needle in ("perplexity", "KL", "greedy prefix agreement", "size on disk", "int8"):
        assert needle in out
    from tritonchat.build.evaluate import default_eval_text

    assert "Fox and the Grapes" in default_eval_text()
    d = reports["int8"].to_dict()
    assert d["ppl_delta_pct"] == pytest.approx(reports["int8"].ppl_delta_pct) and d["size_ratio"] > 0


def test_onnx_reference_and_repository_layout(graphs, tmp_path, tokenizer):  # noqa: F811
    """eval_repository finds REPO/generator/1/model.onnx and REPO/preprocessing/1/tokenizer/."""
    from tritonchat.build.evaluate import eval_repository

    def make_repo(root: Path, precision: str) -> Path:
        gen = root / "generator" / "1"
        shutil.copytree(graphs[precision].parent, gen)
        tokenizer.save_pretrained(str(root / "preprocessing" / "1" / "tokenizer"))
        return root

    repo = make_repo(tmp_path / "int8repo", "int8")
    fp32_repo = make_repo(tmp_path / "fp32repo", "fp32")
    short = tmp_path / "short.txt"
    short.write_text(TEXT.read_text()[:1500])
    # reference: another (FP32) repository, run through ONNX Runtime
    r = eval_repository(repo, short, fp32_repo, prompts=["Once upon a time"], new_tokens=16, threads=1)
    assert r.precision == "int8" and r.reference.endswith("model.onnx")
    assert r.reference_perplexity is not None and r.token_agreement is not None and r.new_tokens == 16
    # no reference, no hf/ folder: absolute figures only
    r2 = eval_repository(repo, short, None, threads=1)
    assert r2.reference_perplexity is None and r2.perplexity == pytest.approx(r.perplexity)
    with pytest.raises(FileNotFoundError):
        eval_repository(tmp_path / "nothing", short, None)


def test_sliding_windows_score_every_token_once():
    from tritonchat.build.evaluate import sliding_windows

    for n, w, s in [(10, 4, 2), (1000, 512, 256), (5, 512, 256), (513, 512, 256)]:
        scored = []
        for begin, end, first in sliding_windows(n, w, s):
            assert end - begin <= w and begin < first <= end
            scored += list(range(first, end))
        assert scored == list(range(1, n))


def test_agreement_counts():
    from tritonchat.build.evaluate import agreement

    prefix, pos, first = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert first == [2, 4] and prefix == pytest.approx(6 / 8) and pos == pytest.approx(7 / 8)

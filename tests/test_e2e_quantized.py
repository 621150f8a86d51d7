"""Quantized builds end to end: the accuracy gate in `tritonchat build`, then the real server."""

from __future__ import annotations

import json

import pytest

from e2e_helpers import STORIES, build_repo, need


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantized_repository_serves_and_records_its_accuracy(tmp_path, precision):
    from tritonchat.client import ChatClient
    from tritonchat.server import TritonServer

    need(STORIES)
    repo = build_repo(STORIES, tmp_path / "repo", precision=precision, max_batch_size=4)
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["precision"] == precision
    acc = manifest["accuracy"]
    assert acc["reference_perplexity"] and abs(acc["perplexity"] / acc["reference_perplexity"] - 1) < 0.05
    assert f'string_value: "{precision}"' in (repo / "generator" / "config.pbtxt").read_text()
    assert json.loads((repo / "generator" / "1" / "kv_spec.json").read_text())["precision"] == precision
    with TritonServer(repo) as srv, ChatClient(srv.grpc_url) as client:
        out = client.generate("Once upon a time", max_tokens=32)
        assert out.num_output_tokens == 32 and out.text.count(" ") > 10  # words, not noise
        assert "".join(d.text for d in client.stream("Once upon a time", max_tokens=32)) == out.text


def test_the_gate_fails_the_build_with_the_figures(tmp_path):
    from tritonchat.build.evaluate import AccuracyGateError

    need(STORIES)
    with pytest.raises(AccuracyGateError, match="perplexity"):
        build_repo(STORIES, tmp_path / "repo", precision="int8", accuracy_bounds={"int8": -0.5})
    assert not (tmp_path / "repo").exists()

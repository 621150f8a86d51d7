"""`--engine torch`: the generator runs the model with PyTorch (here on CPU, float32) in Triton."""

from __future__ import annotations

import pytest

from e2e_helpers import STORIES, build_repo, hf_greedy, need


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory):
    from tritonchat.client import ChatClient
    from tritonchat.server import TritonServer

    need(STORIES)
    repo = build_repo(STORIES, tmp_path_factory.mktemp("torch") / "repo", engine="torch", device="cpu",
                      dtype="float32", max_batch_size=4)
    with TritonServer(repo) as srv, ChatClient(srv.grpc_url) as client:
        yield repo, client


def test_torch_engine_repository_and_greedy_parity(torch_server):
    import concurrent.futures as cf

    from transformers import AutoTokenizer

    repo, client = torch_server
    cfg = (repo / "generator" / "config.pbtxt").read_text()
    assert 'string_value: "torch"' in cfg and (repo / "generator" / "1" / "hf" / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    prompts = ["Once upon a time", "The cat", "Lily and Tom went to the park. They", "A big dog", "Mom said"]
    with cf.ThreadPoolExecutor(5) as pool:  # 5 requests over 4 slots: joins, leaves, slot reuse
        outs = list(pool.map(lambda p: client.generate(p, max_tokens=30), prompts))
    for p, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(STORIES, tok(p)["input_ids"], 30), p

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
        yield repo, client, srv


def test_torch_engine_repository_and_greedy_parity(torch_server):
    import concurrent.futures as cf

    from transformers import AutoTokenizer

    repo, client, _ = torch_server
    cfg = (repo / "generator" / "config.pbtxt").read_text()
    assert 'string_value: "torch"' in cfg and (repo / "generator" / "1" / "hf" / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    prompts = ["Once upon a time", "The cat", "Lily and Tom went to the park. They", "A big dog", "Mom said"]
    with cf.ThreadPoolExecutor(5) as pool:  # 5 requests over 4 slots: joins, leaves, slot reuse
        outs = list(pool.map(lambda p: client.generate(p, max_tokens=30), prompts))
    for p, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(STORIES, tok(p)["input_ids"], 30), p


def test_sampled_requests_drawn_by_the_engine_through_the_real_server(torch_server):
    """Seeded sampled requests (temperature, top_k, top_p; one with presence and repetition penalties)
    and a greedy one with repetition and frequency penalties, six at once beside a plain greedy one,
    through tritonserver with the torch engine, which chooses their tokens itself (`sample_on_device`,
    on by default; on CPU here; the penalties from its own token counts): each answer equals what the
    host's sampler gives that request alone over the same engine in-process (`sample_on_device` off),
    and the plain greedy one equals transformers'. (Penalties exact in float32: the client sends them
    so.)"""
    import concurrent.futures as cf

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from test_gpu_chain import run
    from tritonchat.python_backend.engines.torch import TorchEngine

    repo, client, _ = torch_server
    assert 'key: "sample_on_device", value: { string_value: "true" }' in (repo / "generator" / "config.pbtxt").read_text()
    jobs = [("Once upon a time", dict(temperature=0.9, seed=1)), ("The cat", dict(temperature=1.2, top_p=0.9, seed=2)),
            ("A big dog", dict(temperature=0.7, top_k=20, seed=3)), ("Lily", {}),
            ("Mom said", dict(temperature=1.0, top_k=50, top_p=0.95, seed=4)),
            ("Tom and Sue", dict(repetition_penalty=1.25, frequency_penalty=0.5)),
            ("One day", dict(temperature=0.8, presence_penalty=0.75, repetition_penalty=1.5, seed=5))]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda job: client.generate(job[0], max_tokens=30, **job[1]), jobs))
    hf_tok = AutoTokenizer.from_pretrained(str(STORIES))
    engine = TorchEngine(str(repo / "generator" / "1" / "hf"), max_slots=4, max_seq_len=512, device="cpu",
                         dtype="float32")
    tok = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
    for (prompt, params), out in zip(jobs, outs):
        ids = hf_tok(prompt)["input_ids"]
        alone, _ = run(engine, tok, [(ids, 30, 0, params)], hf_tok.eos_token_id, sample_on_device=False)
        assert out.output_ids == alone[0][2], prompt
    assert outs[3].output_ids == hf_greedy(STORIES, hf_tok("Lily")["input_ids"], 30)
    assert len({tuple(o.output_ids) for o in outs[:3]} | {tuple(outs[3].output_ids)}) == 4
    assert outs[5].output_ids != hf_greedy(STORIES, hf_tok("Tom and Sue")["input_ids"], 30)  # the penalties bit


def test_a_request_arriving_while_others_decode_rides_in_a_decode_step(torch_server):
    """`mix_prefill` (on by default) through the real server: a request sent while another streams
    is prefilled inside a decode step; both answers equal transformers' greedy ones, and the
    generator's statistics at shutdown count the step that carried it."""
    import re

    from transformers import AutoTokenizer

    repo, client, srv = torch_server
    assert 'key: "mix_prefill", value: { string_value: "true" }' in (repo / "generator" / "config.pbtxt").read_text()
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    with client.stream("Once upon a time", max_tokens=120) as long:  # stories260K never says EOS
        for delta in long:
            if delta.output_ids:
                break  # the long answer is decoding now
        short = client.generate("The cat", max_tokens=20)
        for _ in long:
            pass
        ids = long.completion.output_ids
    assert short.output_ids == hf_greedy(STORIES, tok("The cat")["input_ids"], 20)
    assert ids == hf_greedy(STORIES, tok("Once upon a time")["input_ids"], 120)
    srv.stop()  # the last test of the module: the statistics come at shutdown
    line = re.search(r"generator: scheduler (.*)", srv.log_text())
    assert line, "no scheduler statistics in the server log"
    stats = {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line.group(1))}
    assert stats["mixed_steps"] >= 1, stats
    assert stats["launch_ms_mean"] > 0 and stats["decode_wait_ms_mean"] >= 0, stats


def test_int8_weights_through_the_real_server(tmp_path):
    """A `--precision int8-weight-only` torch repository (CPU, bfloat16) in tritonserver: the generator
    loads the 8-bit weights (its describe line says so) and answers, one request at a time, exactly what
    the same engine gives in-process; a bad request beside it is refused and the server keeps serving."""
    import re

    import numpy as np
    from transformers import AutoTokenizer

    from tritonchat.client import ChatClient
    from tritonchat.client.errors import InvalidRequest
    from tritonchat.python_backend.engines.torch import TorchEngine
    from tritonchat.server import TritonServer

    need(STORIES)
    repo = build_repo(STORIES, tmp_path / "repo", engine="torch", device="cpu", dtype="bfloat16",
                      precision="int8-weight-only", max_batch_size=2)
    assert 'key: "precision", value: { string_value: "int8-weight-only" }' in \
        (repo / "generator" / "config.pbtxt").read_text()
    ref = TorchEngine(str(repo / "generator" / "1" / "hf"), max_slots=1, max_seq_len=64, device="cpu",
                      dtype="bfloat16", cuda_graphs=False, weights="int8")
    tok = AutoTokenizer.from_pretrained(str(STORIES))

    def greedy(prompt: str, n: int) -> list:
        ids = np.asarray(tok(prompt)["input_ids"], dtype=np.int64)
        out = [int(np.argmax(ref.prefill(0, ids)))]
        while len(out) < n:
            out.append(int(np.argmax(ref.decode(np.array([0]), np.array([out[-1]]))[0])))
        ref.release(0)
        return out

    with TritonServer(repo) as srv, ChatClient(srv.grpc_url) as client:
        for prompt in ("Once upon a time", "The cat"):
            assert client.generate(prompt, max_tokens=20).output_ids == greedy(prompt, 20), prompt
        with pytest.raises(InvalidRequest, match="max_tokens"):
            client.generate("Once upon a time", max_tokens=0)
        assert len(client.generate("Once upon a time", max_tokens=8).output_ids) == 8
        srv.stop()  # the stub's log lines are all in the server log once it has stopped
        assert re.search(r'weights\\?": \\?"int8', srv.log_text())  # Triton's log escapes the JSON's quotes

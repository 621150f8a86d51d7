"""A seeded random-init Qwen2 with a ChatML chat template, served by the real tritonserver."""

from __future__ import annotations

import json

import pytest

from e2e_helpers import SHARED, build_repo, hf_greedy, need


# tokenize: both ways a prompt becomes ids (the entry's own tokenizer, or a call to preprocessing); and
# the engine in the entry's own process (generate: entry)
@pytest.fixture(scope="module", params=[{"tokenize": "entry"}, {"tokenize": "preprocessing"}, {"generate": "entry"}],
                ids=["tokenized-by-entry", "by-preprocessing", "generate-in-entry"])
def qwen(request, tmp_path_factory):
    from tritonchat.build.synthetic import make_random_model
    from tritonchat.client import ChatClient
    from tritonchat.server import TritonServer

    need(SHARED / "tokenizers" / "gpt2")
    root = tmp_path_factory.mktemp("qwen2")
    model = make_random_model("qwen2", root / "hf", tokenizer="gpt2", seed=3)
    repo = build_repo(model, root / "repo", max_batch_size=8, models={"ensemble": request.param})
    with TritonServer(repo) as srv, ChatClient(srv.grpc_url) as client:
        yield model, repo, client


def test_end_ids_come_from_the_generation_config(qwen):
    model, repo, _ = qwen
    gen = json.loads((repo / "generator" / "1" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [50256, 50258]


def test_plain_prompt_greedy_equals_transformers(qwen):
    from transformers import AutoTokenizer

    model, _, client = qwen
    tok = AutoTokenizer.from_pretrained(str(model))
    for prompt in ["Hello there", "The capital of France is"]:
        out = client.generate(prompt, max_tokens=24)
        assert out.output_ids == hf_greedy(model, tok(prompt)["input_ids"], 24)


@pytest.mark.parametrize("messages", [
    "What is the weather like?",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
])
def test_chat_template_is_applied_like_transformers(qwen, messages):
    from transformers import AutoTokenizer

    model, _, client = qwen
    tok = AutoTokenizer.from_pretrained(str(model))
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = client.generate(messages, max_tokens=20, apply_chat_template=True)
    assert out.num_input_tokens == len(ids)
    assert out.output_ids == hf_greedy(model, list(ids), 20)
    streamed = list(client.stream(messages, max_tokens=20, apply_chat_template=True))
    assert "".join(d.text for d in streamed) == out.text


def test_the_generator_model_runs_the_engine_unless_the_entry_does(qwen):
    """With `generate: entry` the generator model holds no engine and names the model to call; else
    it answers token ids itself, as the entry asks it."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    _, repo, client = qwen
    in_entry = 'key: "generate", value: { string_value: "entry" }' in (repo / "ensemble" / "config.pbtxt").read_text()
    ins = []
    for name, value in (("input_ids", [[11, 12, 13]]), ("input_length", [[3]]), ("max_tokens", [[4]])):
        t = grpcclient.InferInput(name, [1, len(value[0])], "INT32")
        t.set_data_from_numpy(np.array(value, np.int32))
        ins.append(t)
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(client.url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("generator", ins)
        result, error = answers.get(timeout=30)
        c.stop_stream()
    if in_entry:
        assert error is not None and "send requests to `ensemble`" in str(error)
    else:
        assert error is None and result.as_numpy("num_output_tokens").reshape(-1)[0] == 4

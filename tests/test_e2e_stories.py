"""End to end on the real tritonserver: stories260K (a real pretrained tiny Llama).

Builds the repository with `tritonchat build`'s pipeline, serves it with the tritonserver of the
nvidia-pytriton wheel, and talks to it with tritonchat.client (gRPC streaming and HTTP generate).
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import time

import numpy as np
import pytest

from e2e_helpers import STORIES, hf_greedy

PROMPTS = [
    "Once upon a time",
    "The cat sat on the mat. It",
    "Lily and Tom went to the park. They",
    "One day, a little bird",
    "Tim had a big red ball.",
    "The sun was hot and",
    "Mom said",
    "There was a dog named Max. Max liked to",
]


@pytest.fixture(scope="module")
def repo(stories_repo):
    return stories_repo


@pytest.fixture(scope="module")
def server(stories_server):
    return stories_server


@pytest.fixture(scope="module")
def grpc(server):
    from tritonchat.client import ChatClient

    with ChatClient(server.grpc_url, protocol="grpc") as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    from tritonchat.client import ChatClient

    with ChatClient(server.http_url, protocol="http") as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES))


def test_repository_shows_per_model_settings(repo):
    gen = (repo / "generator" / "config.pbtxt").read_text()
    assert "decoupled: true" in gen and 'key: "max_waiting", value: { string_value: "256" }' in gen
    assert 'string_value: "onnxruntime"' in gen and "dynamic_batching {" not in gen
    pre = (repo / "preprocessing" / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 500" in pre and "count: 2" in pre
    assert (repo / "manifest.json").exists()


def test_greedy_equals_transformers_and_reads_as_a_story(grpc, tokenizer):
    for prompt in PROMPTS[:4]:
        ids = tokenizer(prompt)["input_ids"]
        ref = hf_greedy(STORIES, ids, 40)
        out = grpc.generate(prompt, max_tokens=40)
        assert out.output_ids == ref, prompt
        assert out.num_input_tokens == len(ids)
    story = grpc.generate("Once upon a time", max_tokens=40).text
    assert story.startswith(", there was a little girl named Lily. She loved to play outside in the park.")


def test_http_generate_and_generate_stream(http, grpc):
    whole = http.generate("Once upon a time", max_tokens=24)
    assert whole.text == grpc.generate("Once upon a time", max_tokens=24).text
    deltas = list(http.stream("Once upon a time", max_tokens=24))
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == "length"


def test_stream_concatenation_is_the_whole_answer(grpc):
    for prompt in PROMPTS[:3]:
        whole = grpc.generate(prompt, max_tokens=48)
        deltas = list(grpc.stream(prompt, max_tokens=48))
        assert "".join(d.text for d in deltas) == whole.text
        assert [t for d in deltas for t in d.output_ids] == whole.output_ids
        assert deltas[-1].finish_reason == whole.finish_reason


def test_stream_interval_merges_tokens_but_not_the_first(grpc):
    """The default build holds a stream's tokens after the first for 10 ms and sends them as one
    delta: stories260K makes a token in about a millisecond, so 200 tokens come in far fewer
    responses, the first one at once, and the text is still the whole answer."""
    whole = grpc.generate("Once upon a time", max_tokens=200, min_tokens=200)
    deltas = list(grpc.stream("Once upon a time", max_tokens=200, min_tokens=200))
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.output_ids] == whole.output_ids
    assert deltas[0].num_output_tokens == 1
    assert deltas[-1].num_output_tokens == 200 and len(deltas) < 60, len(deltas)  # each token alone: ~130


def test_sixteen_concurrent_streams_return_their_solo_answers(grpc, server):
    from tritonchat.client import ChatClient

    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + 7 * i) for i in range(16)]
    solo = [grpc.generate(p, max_tokens=n).text for p, n in jobs]

    def one(job):
        prompt, n = job
        with ChatClient(server.grpc_url, protocol="grpc") as c:
            return "".join(d.text for d in c.stream(prompt, max_tokens=n))

    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, jobs))
    assert together == solo


def test_stop_words_match_on_text_across_tokens(grpc):
    base = grpc.generate("Once upon a time", max_tokens=40).text
    assert "Lily" in base
    out = grpc.generate("Once upon a time", max_tokens=40, stop=["Lily"])
    assert out.finish_reason == "stop" and out.text == base[: base.index("Lily")]
    # "ly. Sh" spans several tokens and begins inside a word
    streamed = list(grpc.stream("Once upon a time", max_tokens=40, stop=["ly. Sh"]))
    text = "".join(d.text for d in streamed)
    assert text == base[: base.index("ly. Sh")] and streamed[-1].finish_reason == "stop"


def test_sampling_is_seeded_and_validated(grpc):
    a = grpc.generate("Once upon a time", max_tokens=30, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    b = grpc.generate("Once upon a time", max_tokens=30, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    c = grpc.generate("Once upon a time", max_tokens=30, temperature=1.0, top_k=40, top_p=0.9, seed=8)
    assert a.text == b.text
    assert a.text != c.text
    pen = grpc.generate("Once upon a time", max_tokens=30, repetition_penalty=1.3, presence_penalty=0.5,
                        frequency_penalty=0.5)
    assert pen.num_output_tokens == 30


def test_min_tokens_and_eos(grpc):
    # greedy on this prompt ends with the end id quickly; min_tokens holds it back
    free = grpc.generate("The end.", max_tokens=200)
    held = grpc.generate("The end.", max_tokens=200, min_tokens=150)
    assert held.num_output_tokens >= 150
    assert free.finish_reason in ("stop", "length")


def test_exclude_input_in_output_false_returns_prompt(grpc):
    out = grpc.generate("Once upon a time", max_tokens=10, exclude_input_in_output=False)
    assert out.text.startswith("Once upon a time,")


def test_a_raw_prompts_answer_continues_its_text_and_a_chats_starts_alone(grpc, tokenizer):
    """"Tom" goes on with "▁and": raw, the answer keeps the word's space (prompt + answer is the text
    of both); as a chat (the template-less model's default renders the message as it is: the same
    ids) it is the message "and ...", decoded alone as transformers' chat examples decode it."""
    raw = grpc.generate("Tom", max_tokens=12)
    chat = grpc.generate("Tom", max_tokens=12, apply_chat_template=True)
    assert raw.output_ids == chat.output_ids and tokenizer.convert_ids_to_tokens(raw.output_ids[0]) == "▁and"
    assert raw.text == " " + chat.text and chat.text == tokenizer.decode(chat.output_ids)
    assert "Tom" + raw.text == grpc.generate("Tom", max_tokens=12, exclude_input_in_output=False).text
    streamed = grpc.stream("Tom", max_tokens=12, apply_chat_template=True)
    assert "".join(d.text for d in streamed) == chat.text



def test_a_repository_built_before_the_generator_took_apply_chat_template_still_chats(repo, grpc, tmp_path):
    """Newer code over an older repository (its generator config without the input, its manifest
    written so): the entry leaves the input out of the generator call instead of Triton refusing the
    chat ("unexpected inference input"), and raw prompts still continue their text."""
    from tritonchat.client import ChatClient
    from tritonchat.python_backend.manifest import read_manifest, write_manifest
    from tritonchat.server import TritonServer

    old = tmp_path / "repo"
    shutil.copytree(repo, old)
    config = old / "generator" / "config.pbtxt"
    lines = config.read_text().splitlines(keepends=True)
    kept = [line for line in lines if '"apply_chat_template"' not in line]
    assert len(kept) == len(lines) - 1
    config.write_text("".join(kept))
    info = {k: v for k, v in read_manifest(old).items() if k != "files"}
    write_manifest(old, info)
    with TritonServer(old) as srv, ChatClient(srv.grpc_url) as client:
        chat = client.generate("Tom", max_tokens=12, apply_chat_template=True)
        rebuilt = grpc.generate("Tom", max_tokens=12, apply_chat_template=True)
        assert chat.output_ids == rebuilt.output_ids
        assert chat.text.lstrip() == rebuilt.text
        assert client.generate("Tom", max_tokens=12).text == grpc.generate("Tom", max_tokens=12).text

def test_context_limit_ends_with_length(grpc, tokenizer):
    prompt = "Once upon a time " * 120  # ~ 481 tokens of a 512-token context
    n = len(tokenizer(prompt)["input_ids"])
    out = grpc.generate(prompt, max_tokens=200)
    assert out.finish_reason == "length" and out.num_output_tokens == 512 - n


BAD = [
    (dict(prompt="", max_tokens=8), "text_input is empty"),
    (dict(prompt="Hi", max_tokens=0), "max_tokens must be > 0"),
    (dict(prompt="Hi", max_tokens=-3), "max_tokens must be > 0"),
    (dict(prompt="Hi", max_tokens=100000), "exceeds the model's context"),
    (dict(prompt="Once upon a time " * 200, max_tokens=8), "context is 512 tokens"),
    (dict(prompt="Hi", max_tokens=8, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(prompt="Hi", max_tokens=8, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(prompt="Hi", max_tokens=8, temperature=-1.0), "temperature must be >= 0"),
    (dict(prompt="Hi", max_tokens=8, top_k=-2), "top_k must be >= 0"),
    (dict(prompt="Hi", max_tokens=8, repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(prompt="Hi", max_tokens=8, min_tokens=20), "min_tokens 20 is larger than max_tokens 8"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(protocol, grpc, http):
    from tritonchat.client import InvalidRequest

    client = grpc if protocol == "grpc" else http
    for kwargs, message in BAD:
        kwargs = dict(kwargs)
        prompt = kwargs.pop("prompt")
        with pytest.raises(InvalidRequest) as err:
            client.generate(prompt, **kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
        with pytest.raises(InvalidRequest) as err:
            list(client.stream(prompt, **kwargs))
        assert message in str(err.value)
    assert client.generate("Once upon a time", max_tokens=5).num_output_tokens == 5


def test_raw_protocol_errors(server):
    """Missing max_tokens, wrong dtype, invalid UTF-8, unknown model: Triton's and our checks."""
    import json
    import urllib.error
    import urllib.request

    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    def post(path, body):
        req = urllib.request.Request(f"http://{server.http_url}{path}", data=json.dumps(body).encode())
        try:
            urllib.request.urlopen(req)
            return 200, ""
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    code, msg = post("/v2/models/ensemble/generate", {"text_input": "Hi"})
    assert code == 400 and "max_tokens" in msg
    code, msg = post("/v2/models/nope/generate", {"text_input": "Hi", "max_tokens": 4})
    assert code in (400, 404) and "nope" in msg

    client = g.InferenceServerClient(server.grpc_url)

    def call(inputs):
        results = []
        client.start_stream(callback=lambda result, error: results.append((result, error)))
        client.async_stream_infer("ensemble", inputs)
        client.stop_stream()
        return [e for _, e in results if e is not None]

    text = g.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"\xff\xfeHi"]], dtype=object))
    mt = g.InferInput("max_tokens", [1, 1], "INT32")
    mt.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    errors = call([text, mt])
    assert errors and "not valid UTF-8" in str(errors[0])

    wrong = g.InferInput("max_tokens", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.array([[4.0]], dtype=np.float32))
    ok_text = g.InferInput("text_input", [1, 1], "BYTES")
    ok_text.set_data_from_numpy(np.array([[b"Hi"]], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        errors = call([ok_text, wrong])
        if errors:
            raise errors[0]
    assert "data-type" in str(err.value) or "datatype" in str(err.value).lower()
    client.close()


def test_cancelled_stream_frees_its_slot(server, grpc):
    from tritonchat.client import ChatClient

    # fill every slot with long streams, cancel them all after a few deltas
    def start_and_cancel(_):
        with ChatClient(server.grpc_url, protocol="grpc") as c:
            s = c.stream("Once upon a time", max_tokens=400, min_tokens=400)
            for i, _ in enumerate(s):
                if i == 3:
                    s.cancel()
                    break
            return True

    with cf.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(start_and_cancel, range(16)))
    # all 16 slots must be free again: 16 new requests finish promptly with full answers
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda _: grpc.generate("Once upon a time", max_tokens=20), range(16)))
    assert all(o.num_output_tokens == 20 for o in outs)
    assert time.perf_counter() - t0 < 60


def test_tampered_artifact_is_refused_naming_the_file(repo, tmp_path):
    from tritonchat.server import ServerStartError, TritonServer

    bad = tmp_path / "tampered"
    shutil.copytree(repo, bad)
    target = bad / "generator" / "1" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ServerStartError) as err:
        with TritonServer(bad, startup_timeout=90):
            pass
    assert "generator/1/model.onnx" in str(err.value)


def test_generator_metrics_on_the_prometheus_endpoint(server, grpc):
    import urllib.request

    grpc.generate("Once upon a time", max_tokens=10)
    text = urllib.request.urlopen(f"http://{server.metrics_url}/metrics").read().decode()
    assert 'tritonchat_requests_total{model="generator",reason="length"}' in text
    tokens = [line for line in text.splitlines() if line.startswith("tritonchat_generated_tokens_total")]
    assert tokens and float(tokens[0].split()[-1]) >= 10
    assert "tritonchat_time_to_first_token_seconds_bucket" in text
    assert 'nv_inference_request_success{model="ensemble"' in text

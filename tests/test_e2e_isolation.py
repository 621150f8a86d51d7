"""No request harms another, against the real tritonserver: one bad request among 15 good ones that
share its dynamic batch, prefill or decode steps fails alone, with a message that names the problem
and holds no traceback, no server path and nothing of another request; the 15 get their answers.

The engine failures are injected (python_backend/faults.py, TRITONCHAT_FAULTS) for the requests
whose prompt holds a marker token; everything else is the real pipeline."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2e_helpers import STORIES, build_repo, need

pytestmark = pytest.mark.slow

GOOD = ["Once upon a time", "The cat", "A dog", "Tom", "Lily", "The sun"]
# prompts tokenized by stories260K: "Z" holds token 469, "X" 478, "J" 454, "V" 470, "Q" 473; no good
# prompt holds any of them
MARKERS = {"prefill_error": ("Once upon a time Z", 469), "nan_logits": ("Once upon a time X", 478),
           "neginf_logits": ("Once upon a time J", 454), "step_error": ("Once upon a time V", 470),
           "oom": ("Once upon a time Q", 473)}
N_TOKENS = 24


def clean(message: str, *others: str) -> None:
    """An error text for a client: no traceback, no server path, no other request's words."""
    assert "Traceback" not in message and 'File "' not in message, message
    assert "/work/" not in message and "/tmp/" not in message and "site-packages" not in message, message
    for other in others:
        assert other not in message, (other, message)


@pytest.fixture(scope="module")
def faulty_server(stories_repo):
    from tritonchat.install import server_env
    from tritonchat.server import TritonServer

    env = dict(server_env(), TRITONCHAT_FAULTS=",".join(f"{k}:{tok}" for k, (_, tok) in MARKERS.items()))
    with TritonServer(stories_repo, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def solo(stories_server):
    """Each good prompt's greedy answer, alone, from an unfaulted server."""
    from tritonchat.client import ChatClient

    with ChatClient(stories_server.grpc_url) as c:
        return {p: c.generate(p, max_tokens=N_TOKENS).text for p in GOOD}


def together(url: str, bad: dict, good_kwargs: dict | None = None, protocol: str = "grpc"):
    """15 good requests and one bad one (`bad`: kwargs of generate), all at once; ([good results], bad error)."""
    from tritonchat.client import ChatClient, TritonChatError

    jobs = [dict(prompt=GOOD[i % len(GOOD)], max_tokens=N_TOKENS, **(good_kwargs or {})) for i in range(15)]
    jobs.insert(7, dict(bad))

    def run(kw):
        kw = dict(kw)
        prompt = kw.pop("prompt")
        with ChatClient(url, protocol=protocol) as c:
            try:
                return c.generate(prompt, **kw)
            except TritonChatError as exc:
                return exc

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    bad_result = results.pop(7)
    jobs.pop(7)
    return list(zip(jobs, results)), bad_result


def check_good(pairs, solo):
    for kw, res in pairs:
        assert not isinstance(res, Exception), f"a good request failed: {res}"
        assert res.text == solo[kw["prompt"]], kw["prompt"]


@pytest.mark.parametrize("kind, temperature, message", [
    ("prefill_error", None, "prefill failed"),
    ("nan_logits", None, "non-finite logits"),
    ("neginf_logits", 0.8, "sampling failed"),
])
def test_a_failing_request_fails_alone(faulty_server, solo, kind, temperature, message):
    prompt, _ = MARKERS[kind]
    bad = dict(prompt=prompt, max_tokens=N_TOKENS)
    if temperature is not None:
        bad.update(temperature=temperature, seed=1)
    pairs, err = together(faulty_server.grpc_url, bad)
    assert isinstance(err, Exception), f"the bad request succeeded: {err}"
    assert message in str(err), str(err)
    clean(str(err), *GOOD)
    check_good(pairs, solo)


@pytest.mark.parametrize("kind", ["step_error", "oom"])
def test_an_engine_failure_in_a_step_fails_that_step_fast_and_the_server_goes_on(faulty_server, solo, kind):
    """An exception (or an out-of-memory) in one decode step fails the requests of that step at once
    (never a hang); the next requests are served."""
    from tritonchat.client import ChatClient, TritonChatError

    prompt, _ = MARKERS[kind]
    t = time.perf_counter()
    with ChatClient(faulty_server.grpc_url) as c:
        with pytest.raises(TritonChatError) as err:
            c.generate(prompt, max_tokens=N_TOKENS)
        assert time.perf_counter() - t < 2.0
        assert "generator failed" in str(err.value) and ("RuntimeError" in str(err.value) or "MemoryError" in str(err.value))
        clean(str(err.value), *GOOD)
        assert c.generate(GOOD[0], max_tokens=N_TOKENS).text == solo[GOOD[0]]


@pytest.fixture(scope="module")
def template_server(tmp_path_factory):
    """stories260K with a chat template that refuses a system message (as Gemma's does)."""
    from tritonchat.server import TritonServer

    need(STORIES)
    model = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(STORIES, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}\n{% endfor %}")
    cfg_path.write_text(json.dumps(cfg))
    repo = build_repo(model, tmp_path_factory.mktemp("templated-repo") / "repo")
    with TritonServer(repo) as srv:
        yield srv


def test_a_message_the_template_refuses_fails_alone(template_server):
    from tritonchat.client import ChatClient

    msgs = lambda p: json.dumps([{"role": "user", "content": p}])  # noqa: E731
    with ChatClient(template_server.grpc_url) as c:
        solo_answers = {p: c.generate(msgs(p), max_tokens=N_TOKENS, apply_chat_template=True).text for p in GOOD}
    bad = dict(prompt=json.dumps([{"role": "system", "content": "secret system words"},
                                  {"role": "user", "content": "Hi"}]), max_tokens=N_TOKENS, apply_chat_template=True)
    from tritonchat.client import TritonChatError

    def run(kw):
        kw = dict(kw)
        prompt = kw.pop("prompt")
        with ChatClient(template_server.http_url, protocol="http") as cc:
            try:
                return cc.generate(prompt, **kw)
            except TritonChatError as exc:
                return exc

    jobs = [dict(prompt=msgs(GOOD[i % len(GOOD)]), max_tokens=N_TOKENS, apply_chat_template=True) for i in range(15)]
    jobs.insert(3, bad)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    err = results.pop(3)
    jobs.pop(3)
    assert isinstance(err, Exception) and "System role not supported" in str(err), err
    clean(str(err), *GOOD)
    for kw, res in zip(jobs, results):
        assert not isinstance(res, Exception), res
        assert res.text == solo_answers[json.loads(kw["prompt"])[0]["content"]]


def test_a_token_id_out_of_range_sent_to_the_generator_fails_alone(stories_server, solo):
    """The internal generator validates as if it were public: a negative or too large id fails its
    own request, not the shared prefill of the others."""
    import numpy as np
    import tritonclient.grpc as g

    from tritonchat.client import ChatClient

    def gen_inputs(ids):
        out = []
        for name, val, dt in (("input_ids", np.array([ids], np.int32), "INT32"),
                              ("input_length", np.array([[len(ids)]], np.int32), "INT32"),
                              ("max_tokens", np.array([[N_TOKENS]], np.int32), "INT32")):
            i = g.InferInput(name, list(val.shape), dt)
            i.set_data_from_numpy(val)
            out.append(i)
        return out

    errors = []
    client = g.InferenceServerClient(stories_server.grpc_url)
    client.start_stream(callback=lambda result, error: errors.append(error) if error else None)
    try:
        for bad in ([1, 403, -5], [1, 403, 100000]):
            with ThreadPoolExecutor(15) as pool:
                futures = [pool.submit(lambda p=p: ChatClient(stories_server.grpc_url).generate(p, max_tokens=N_TOKENS))
                           for p in GOOD * 2 + GOOD[:3]]
                client.async_stream_infer("generator", gen_inputs(bad))
                results = [f.result(timeout=60) for f in futures]
            for p, r in zip(GOOD * 2 + GOOD[:3], results):
                assert r.text == solo[p]
    finally:
        client.stop_stream()
        client.close()
    assert len(errors) == 2 and all("outside the vocabulary" in str(e) for e in errors), errors

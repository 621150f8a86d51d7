"""The OpenAI-compatible gateway (a real child process) in front of the real tritonserver (stories260K),
called with the official `openai` SDK, sync and async, streamed and not, and with raw HTTP for what
an SDK would never send (wrong types, invalid UTF-8, huge bodies)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import pytest

from e2e_helpers import STORIES, need

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The cat sat on the mat. It", "One day, a little bird", "Tim had a big red ball."]
FRESH = {"Cache-Control": "no-store"}  # neither read nor write the response cache: the real path every time


@pytest.fixture(scope="module")
def gateway(stories_server):
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess

    need(STORIES)
    cfg = GatewayConfig(triton_url=stories_server.grpc_url, metrics_url=stories_server.metrics_url, port=0,
                        served_model_names=["ensemble", "stories260K"])
    with GatewayProcess(cfg) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway):
    import openai

    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc(stories_server):
    from tritonchat.client import ChatClient

    with ChatClient(stories_server.grpc_url) as c:
        yield c


def _raw(gateway, method: str, path: str, body: bytes = b"", headers=None):
    host, port = gateway.config.host, gateway.config.port
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_models_health_and_one_scrape_for_both(gateway, client, stories_server):
    assert [m.id for m in client.models.list().data] == ["ensemble", "stories260K"]
    assert client.models.retrieve("stories260K").id == "stories260K"
    assert _raw(gateway, "GET", "/health/live")[0] == 200
    assert _raw(gateway, "GET", "/health/ready")[0] == 200
    status, headers, body = _raw(gateway, "HEAD", "/metrics")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/plain")
    client.completions.create(model="ensemble", prompt="Hi", max_tokens=2, extra_headers=FRESH)
    text = _raw(gateway, "GET", "/metrics")[2].decode()
    assert 'tritonchat_gateway_requests_total{endpoint="completions",status="200"}' in text
    assert 'nv_inference_request_success{model="ensemble"' in text  # Triton's, relayed
    assert "tritonchat_gateway_triton_metrics_up 1.0" in text


def test_greedy_answers_and_usage_equal_the_entry_models(client, grpc):
    for prompt in PROMPTS:
        ref = grpc.generate(prompt, max_tokens=40)
        whole = client.completions.create(model="ensemble", prompt=prompt, max_tokens=40, extra_headers=FRESH)
        assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == ref.finish_reason
        echoed = client.completions.create(model="ensemble", prompt=prompt, max_tokens=40, echo=True,
                                           extra_headers=FRESH)
        assert echoed.choices[0].text == prompt + ref.text  # the text continues the prompt's
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (ref.num_input_tokens,
                                                                              ref.num_output_tokens)
        chunks = list(client.completions.create(model="stories260K", prompt=prompt, max_tokens=40, stream=True,
                                                stream_options={"include_usage": True}, extra_headers=FRESH))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].usage.completion_tokens == ref.num_output_tokens
        assert chunks[-1].usage.prompt_tokens == ref.num_input_tokens


def test_multi_turn_chat_equals_the_entry_models_chat(client, grpc):
    messages = [{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": "Once upon a time"},
                {"role": "assistant", "content": "there was a little girl named Lily."},
                {"role": "user", "content": "What did she love?"}]
    ref = grpc.generate(messages, max_tokens=30, apply_chat_template=True)
    out = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=30, extra_headers=FRESH)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == ref.num_input_tokens and out.usage.completion_tokens == ref.num_output_tokens
    stream = client.chat.completions.create(model="ensemble", messages=messages, max_completion_tokens=30,
                                            stream=True, extra_headers=FRESH)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text


def test_async_sdk_streams_concurrently_and_each_gets_its_solo_answer(gateway, grpc):
    import openai

    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + 9 * i) for i in range(8)]
    solo = [grpc.generate(p, max_tokens=n).text for p, n in jobs]

    async def main():
        async with openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0) as aclient:
            async def one(prompt, n):
                stream = await aclient.completions.create(model="ensemble", prompt=prompt, max_tokens=n, stream=True,
                                                          extra_headers=FRESH)
                return "".join([c.choices[0].text async for c in stream])

            together = await asyncio.gather(*(one(p, n) for p, n in jobs))
            whole = await aclient.chat.completions.create(
                model="ensemble", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12,
                extra_headers=FRESH)
            return together, whole

    together, whole = asyncio.run(main())
    assert together == solo
    assert whole.usage.completion_tokens == 12


def test_stop_works_across_chunk_boundaries(client, grpc):
    base = grpc.generate("Once upon a time", max_tokens=40).text
    for stop in ("ly. Sh", ["zzz", "Lily"]):
        first = stop if isinstance(stop, str) else "Lily"
        chunks = list(client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=40,
                                                stop=stop, stream=True, extra_headers=FRESH))
        assert "".join(c.choices[0].text for c in chunks) == base[: base.index(first)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_through_the_gateway(client):
    def ask(seed):
        return client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=30, temperature=1.0,
                                         top_p=0.9, seed=seed, extra_body={"top_k": 40},
                                         extra_headers=FRESH).choices[0].text

    assert ask(7) == ask(7) != ask(8)


# every body here must get a 4xx in OpenAI's error shape, and the gateway must keep serving
CHAT_OK = {"model": "ensemble", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
CORPUS = [
    ("/v1/chat/completions", {**CHAT_OK, "max_tokens": "4"}),
    ("/v1/chat/completions", {**CHAT_OK, "max_tokens": 4.5}),
    ("/v1/chat/completions", {**CHAT_OK, "temperature": "hot"}),
    ("/v1/chat/completions", {**CHAT_OK, "temperature": -1}),
    ("/v1/chat/completions", {**CHAT_OK, "top_p": 0}),
    ("/v1/chat/completions", {**CHAT_OK, "stream": "yes"}),
    ("/v1/chat/completions", {**CHAT_OK, "seed": -5}),
    ("/v1/chat/completions", {**CHAT_OK, "seed": 2 ** 64}),
    ("/v1/chat/completions", {**CHAT_OK, "presence_penalty": 3}),
    ("/v1/chat/completions", {**CHAT_OK, "model": 5}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": "Hi"}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [1]}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": []}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "user"}]}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"content": "Hi"}]}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "wizard", "content": "Hi"}]}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "tool", "content": "Hi", "tool_call_id": "1"}]}),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("/v1/chat/completions", {"messages": CHAT_OK["messages"]}),
    ("/v1/chat/completions", {"model": "ensemble"}),
    ("/v1/chat/completions", {**CHAT_OK, "n": 2}),
    ("/v1/chat/completions", {**CHAT_OK, "model": "gpt-4o"}),
    ("/v1/chat/completions", {**CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/chat/completions", {**CHAT_OK, "stop": ["x" * 300]}),
    ("/v1/chat/completions", {**CHAT_OK, "stop": [1, 2]}),
    ("/v1/chat/completions", {**CHAT_OK, "logprobs": True}),
    ("/v1/chat/completions", {**CHAT_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/chat/completions", {**CHAT_OK, "response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {**CHAT_OK, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {**CHAT_OK, "max_tokens": 100000}),  # Triton: exceeds the context
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "user", "content": "Once upon a time " * 200}]}),
    ("/v1/chat/completions", {**CHAT_OK, "min_tokens": 10}),
    ("/v1/chat/completions", {**CHAT_OK, "unknown_field": 1}),
    ("/v1/completions", {"model": "ensemble", "prompt": [1, 2, 3]}),
    ("/v1/completions", {"model": "ensemble", "prompt": ["a", "b"]}),
    ("/v1/completions", {"model": "ensemble"}),
    ("/v1/completions", {"model": "ensemble", "prompt": "Hi", "echo": "yes"}),
    ("/v1/completions", {"model": "ensemble", "prompt": "Hi", "best_of": 2}),
    ("/v1/completions", {"model": "ensemble", "prompt": ""}),
    ("/v1/completions", {"model": "ensemble", "prompt": "Hi", "max_tokens": 0}),
]
RAW = [
    ("/v1/chat/completions", b'{"model": "ensemble", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("/v1/chat/completions", b'{"model": "ensemble", "messages": [{"role": "user", "content": "a\\ud800"}]}'),
    ("/v1/chat/completions", b'{"model": "ensemble", '),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", b""),
    ("/v1/chat/completions", b"null"),
    ("/v1/completions", b'{"model": "ensemble", "prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'),  # > 4 MiB
]


def test_bad_request_corpus_is_all_4xx_in_openais_shape(gateway, client):
    answers = []
    for path, body in CORPUS:
        answers.append((path, body, *_raw(gateway, "POST", path, json.dumps(body).encode())))
    for path, body in RAW:
        answers.append((path, body[:80], *_raw(gateway, "POST", path, body)))
    answers.append(("GET /v1/chat/completions", b"", *_raw(gateway, "GET", "/v1/chat/completions")))
    answers.append(("/v1/nothing", b"", *_raw(gateway, "POST", "/v1/nothing", b"{}")))
    bad = []
    for path, body, status, _headers, raw in answers:
        try:
            err = json.loads(raw)["error"]
            shaped = set(err) == {"message", "type", "param", "code"} and err["message"]
        except (ValueError, KeyError, TypeError):
            shaped = False
        if not (400 <= status < 500 and shaped):
            bad.append((path, body, status, raw[:200]))
    assert not bad, bad
    statuses = {s for *_, s, _h, _r in answers}
    assert {400, 404, 405, 413} <= statuses, statuses
    assert client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=5,
                                     extra_headers=FRESH).usage.completion_tokens == 5


def test_sdk_raises_the_right_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # refused by Triton: the prompt is over the context
        list(client.completions.create(model="ensemble", prompt="Once upon a time " * 200, max_tokens=4,
                                       stream=True))
    assert "context is 512 tokens" in err.value.message


def test_deterministic_answers_come_from_the_cache_and_sampled_ones_never(client, stories_server):
    from tritonchat.gateway.process import metric, scrape

    def ensemble_requests():
        return metric(scrape(stories_server.metrics_url), "nv_inference_request_success", model="ensemble")

    msgs = [{"role": "user", "content": "Tell me about a red ball."}]
    first = client.chat.completions.with_raw_response.create(model="ensemble", messages=msgs, max_tokens=24,
                                                             temperature=0)
    before = ensemble_requests()
    again = client.chat.completions.with_raw_response.create(model="ensemble", messages=msgs, max_tokens=24,
                                                             temperature=0)
    streamed = client.chat.completions.with_raw_response.create(model="ensemble", messages=msgs, max_tokens=24,
                                                                temperature=0, stream=True)
    assert (first.headers["x-cache"], again.headers["x-cache"], streamed.headers["x-cache"]) == ("miss", "hit", "hit")
    assert ensemble_requests() == before  # the hits never reached Triton
    a, b = first.parse(), again.parse()
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage == b.usage
    assert "".join(c.choices[0].delta.content or "" for c in streamed.parse()) == a.choices[0].message.content
    assert a.system_fingerprint and "generator:" in a.system_fingerprint
    # other parameters, other key
    assert client.chat.completions.with_raw_response.create(
        model="ensemble", messages=msgs, max_tokens=25, temperature=0).headers["x-cache"] == "miss"
    sampled = [client.chat.completions.with_raw_response.create(model="ensemble", messages=msgs, max_tokens=24,
                                                                temperature=0.9) for _ in range(2)]
    assert [r.headers["x-cache"] for r in sampled] == ["bypass", "bypass"]
    refresh = client.chat.completions.with_raw_response.create(model="ensemble", messages=msgs, max_tokens=24,
                                                               extra_headers={"Cache-Control": "no-cache"})
    assert refresh.headers["x-cache"] == "miss"


def _abandon(gateway, body: dict) -> float:
    """Start a streamed request, read its first chunk, and vanish (close the socket, no HTTP goodbye);
    returns when it closed (time.monotonic)."""
    conn = http.client.HTTPConnection(gateway.config.host, gateway.config.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json", **FRESH})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    line = resp.readline()  # de-chunked by http.client
    assert line.startswith(b"data: "), line
    conn.close()
    return time.monotonic()


def _abandon_many(gateway, body: dict, n: int) -> float:
    """`n` streams at once, each abandoned after its first chunk (so none can finish first); the last close."""
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(n) as pool:
        return max(pool.map(lambda _: _abandon(gateway, body), range(n)))


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


LONG = {"model": "ensemble", "prompt": "Once upon a time", "max_tokens": 500, "min_tokens": 500}


def test_a_client_that_goes_away_cancels_its_triton_call(gateway):
    """The gateway's side: the disconnect is seen, the gRPC call cancelled, nothing left in flight."""
    from tritonchat.gateway.process import metric, scrape

    gone = metric(scrape(gateway.base_url), "tritonchat_gateway_client_disconnects_total")
    _abandon_many(gateway, LONG, 4)
    for _ in range(2):  # and clients gone before their first chunk
        conn = http.client.HTTPConnection(gateway.config.host, gateway.config.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({**LONG, "stream": True}).encode(),
                     headers={"Content-Type": "application/json", **FRESH})
        conn.close()
    _wait(lambda: metric(scrape(gateway.base_url), "tritonchat_gateway_client_disconnects_total") == gone + 6, 10,
          "six disconnects seen")
    _wait(lambda: metric(scrape(gateway.base_url), "tritonchat_gateway_in_flight_requests") == 0, 10,
          "the gateway's requests in flight back to 0")


def test_client_disconnect_frees_the_generator_slot_within_a_decode_step(gateway, stories_server):
    """Through Triton's metrics: the generator stops each abandoned sequence at once (finish reason
    `cancelled`) instead of generating its 500 tokens for nobody. Needs an entry model that passes
    cancellation to the generator (a Triton ensemble does not: python_backend/entry.py does)."""
    from tritonchat.gateway.process import metric, scrape

    def triton():
        return scrape(stories_server.metrics_url)

    def settled():  # the generator's metrics are sent every few ms: wait until earlier requests are counted
        a = triton()
        time.sleep(0.3)
        b = triton()
        return metric(a, "tritonchat_requests_total") == metric(b, "tritonchat_requests_total") and \
            metric(a, "tritonchat_generated_tokens_total") == metric(b, "tritonchat_generated_tokens_total")

    _wait(settled, 30, "the generator is idle")
    m0 = triton()
    n = 8
    t_close = _abandon_many(gateway, LONG, n)

    def finished(m):
        return metric(m, "tritonchat_requests_total", model="generator") - metric(m0, "tritonchat_requests_total",
                                                                                   model="generator")

    _wait(lambda: finished(triton()) >= n, 30, f"the generator finished the {n} requests")
    ended_after = time.monotonic() - t_close
    m2 = triton()
    cancelled = (metric(m2, "tritonchat_requests_total", model="generator", reason="cancelled")
                 - metric(m0, "tritonchat_requests_total", model="generator", reason="cancelled"))
    produced = metric(m2, "tritonchat_generated_tokens_total") - metric(m0, "tritonchat_generated_tokens_total")
    steps = metric(m2, "tritonchat_decode_steps_total") - metric(m0, "tritonchat_decode_steps_total")
    print(f"{n} abandoned requests ended {ended_after * 1e3:.0f} ms after the last disconnect; {produced:.0f} "
          f"tokens in {steps:.0f} decode steps; {cancelled:.0f} cancelled")
    assert cancelled == n, f"{cancelled} of {n} abandoned requests ended as cancelled in the generator"
    assert produced < n * 500 / 2, f"{produced} tokens generated for {n} abandoned 500-token requests"
    # and the slots show as free on the gauge operators watch
    _wait(lambda: metric(triton(), "tritonchat_running_sequences") == 0, 5,
          "tritonchat_running_sequences back to 0 after the cancellations")


def test_chat_repl_keeps_the_history(stories_server, grpc):
    """`tritonchat chat -i`: each turn sends the whole conversation; answers on stdout, the rest on stderr."""
    import subprocess
    import sys

    turns = ["Once upon a time", "What did the girl like?"]
    proc = subprocess.run([sys.executable, "-m", "tritonchat.cli", "chat", "-i", "--url", stories_server.grpc_url,
                           "--max-tokens", "12", "--system", "You tell stories."],
                          input="\n".join([turns[0], "/history", turns[1], "/exit"]) + "\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    history = [{"role": "system", "content": "You tell stories."}]
    expected = ""
    for turn in turns:
        history.append({"role": "user", "content": turn})
        answer = grpc.generate(history, max_tokens=12, apply_chat_template=True).text
        history.append({"role": "assistant", "content": answer})
        expected += answer + ("" if answer.endswith("\n") else "\n")
    assert proc.stdout == expected
    assert "user: Once upon a time" in proc.stderr and proc.stderr.count("finish=") == 2


def test_bench_measures_the_gateway_against_direct_grpc(gateway, stories_server, stories_repo, tmp_path):
    """`tritonchat bench --url GRPC --openai-url GATEWAY` (a smoke run: figures come from the benchmark)."""
    from tritonchat.loadtest.bench import BenchConfig
    from tritonchat.loadtest.gateway_bench import run_gateway_compare

    cfg = BenchConfig(url=stories_server.grpc_url, concurrency=[1, 2], prompt_len=8, output_len=16,
                      requests_per_level=4, out=tmp_path, tokenizer=stories_repo / "preprocessing" / "1" / "tokenizer")
    result = run_gateway_compare(cfg, gateway.base_url.removeprefix("http://"), start_gateway=False)
    for side in ("direct", "gateway"):
        levels = result[side]["levels"]
        assert [lv["concurrency"] for lv in levels] == [1, 2]
        assert all(lv["errors"] == 0 and lv["tokens_per_request"] == 16 and lv["prompt_tokens"] == 8
                   for lv in levels), levels
    assert [row["concurrency"] for row in result["overhead"]] == [1, 2]
    assert all(row["tok_s_ratio"] > 0 and row["gateway_ttft_p50_ms"] > 0 for row in result["overhead"])
    assert (tmp_path / "gateway_compare.json").exists() and (tmp_path / "gateway_compare.md").exists()

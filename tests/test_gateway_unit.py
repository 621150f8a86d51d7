"""The gateway's parts without a server: request validation, error mapping, keys, limits, the cache,
the response shapes, the config (the end-to-end tests run them against the real tritonserver)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from pydantic import ValidationError

from tritonchat.gateway.auth import KeyFileError, KeyStore, parse_key_file
from tritonchat.gateway.cache import CachedAnswer, MemoryCache, cache_key
from tritonchat.gateway.config import GatewayConfig, Limits, load_config
from tritonchat.gateway.errors import APIError, from_triton, from_validation
from tritonchat.gateway.limits import Limiter
from tritonchat.gateway.responses import Shaper
from tritonchat.gateway.schemas import ChatRequest, CompletionRequest, prepare


def _prep(body: dict, schema=ChatRequest, **kw):
    req = schema.model_validate_json(json.dumps(body))
    return prepare(req, default_max_tokens=kw.get("default", 512), max_stop=kw.get("max_stop", 4),
                   max_stop_chars=kw.get("max_stop_chars", 256))


def _refusal(body: dict, schema=ChatRequest) -> APIError:
    try:
        _prep(body, schema)
    except ValidationError as exc:
        return from_validation(exc.errors())
    except APIError as exc:
        return exc
    raise AssertionError(f"accepted: {body}")


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def test_chat_becomes_the_contract_request():
    p = _prep({**CHAT, "messages": [{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                 {"type": "text", "text": "there"}]}],
               "max_completion_tokens": 7, "temperature": 0, "top_k": 3, "stop": "x", "seed": 5})
    assert p.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    f = p.params.set_fields()
    assert f == {"max_tokens": 7, "temperature": 0.0, "top_k": 3, "seed": 5, "stop": ["x"],
                 "apply_chat_template": True}
    assert p.kind == "chat" and p.deterministic and not p.stream


def test_completion_defaults_echo_and_ignore_eos():
    p = _prep({"model": "m", "prompt": ["Once"], "echo": True, "ignore_eos": True}, CompletionRequest, default=300)
    assert p.prompt == "Once"
    assert p.params.set_fields() == {"max_tokens": 300, "min_tokens": 300, "exclude_input_in_output": False}
    assert p.deterministic  # temperature omitted: the server's default is greedy


def test_only_greedy_or_seeded_requests_are_deterministic():
    assert not _prep({**CHAT, "temperature": 0.8}).deterministic
    assert _prep({**CHAT, "temperature": 0.8, "seed": 1}).deterministic
    assert _prep({**CHAT, "temperature": 0}).deterministic


@pytest.mark.parametrize("body,param,words", [
    ({**CHAT, "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({**CHAT, "max_tokens": 5.0}, "max_tokens", "valid integer"),
    ({**CHAT, "max_tokens": True}, "max_tokens", "valid integer"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**CHAT, "temperature": "hot"}, "temperature", "valid number"),
    ({**CHAT, "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({**CHAT, "top_p": 0}, "top_p", "greater than 0"),
    ({**CHAT, "stream": "yes"}, "stream", "valid boolean"),
    ({**CHAT, "stop": 3}, "stop", "string or a list of strings"),
    ({**CHAT, "stop": ["a", 1]}, "stop", "string or a list of strings"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({**CHAT, "stop": [""]}, "stop", "must not be empty"),
    ({**CHAT, "seed": -1}, "seed", "[0, 2**64)"),
    ({**CHAT, "n": 2}, "n", "only n = 1"),
    ({**CHAT, "logprobs": True}, "logprobs", "not supported"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({**CHAT, "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({**CHAT, "frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    ({"model": "m"}, "messages", "Missing required parameter"),
    ({"messages": CHAT["messages"]}, "model", "Missing required parameter"),
    ({**CHAT, "messages": []}, "messages", "at least 1"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'user'"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'assistant'"),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages.0.content", "Missing required"),
    ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "string or a list"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content", "text only"),
    ({**CHAT, "messages": [{"role": "user", "content": "  "}]}, "messages", "every message is empty"),
    ({**CHAT, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "differ"),
    ({**CHAT, "max_tokens": 5, "min_tokens": 6}, "min_tokens", "larger than max_tokens"),
])
def test_bad_chat_requests_name_the_field(body, param, words):
    err = _refusal(body)
    assert err.status == 400
    assert err.param == param or (err.param or "").startswith(param), (err.param, err.message)
    assert words in err.message, err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,words", [
    ({"model": "m", "prompt": [1, 2, 3]}, "token-id prompts"),
    ({"model": "m", "prompt": ["a", "b"]}, "exactly one prompt"),
    ({"model": "m", "prompt": ""}, "prompt is empty"),
    ({"model": "m", "prompt": "x", "best_of": 3}, "not supported"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "not supported"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "not supported"),
    ({"model": "m", "prompt": "x", "messages": []}, "Unrecognized"),
])
def test_bad_completion_requests(body, words):
    err = _refusal(body, CompletionRequest)
    assert err.status == 400 and words in err.message, err.message


def test_lone_surrogates_and_bad_json_are_400():
    raw = '{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    try:
        prepare(ChatRequest.model_validate_json(raw), default_max_tokens=8, max_stop=4, max_stop_chars=9)
        raise AssertionError("accepted a lone surrogate")
    except ValidationError as exc:
        err = from_validation(exc.errors())
    except APIError as exc:
        err = exc
    assert err.status == 400
    with pytest.raises(ValidationError) as bad:
        ChatRequest.model_validate_json('{"model": "m", ')
    assert "could not parse the JSON body" in from_validation(bad.value.errors()).message
    with pytest.raises(ValidationError) as arr:
        ChatRequest.model_validate_json('[1, 2]')
    assert from_validation(arr.value.errors()).message == "The request body must be a JSON object."


@pytest.mark.parametrize("message,status,code", [
    ("in ensemble 'ensemble', prompt is 802 tokens; the model's context is 512 tokens", 400, None),
    ("Exceeds maximum queue size", 503, "overloaded"),
    ("generator queue is full (1 waiting requests); retry later", 503, "overloaded"),
    ("failed to connect to all addresses", 503, "unavailable"),
    ("Request for unknown model: 'ensemble' is not found", 503, "model_not_ready"),
    ("Deadline Exceeded", 504, "timeout"),
])
def test_triton_messages_map_to_openai_statuses(message, status, code):
    """Triton 2.51 drops the Python backend's error codes inside a stream: the text decides."""
    from tritonchat.client.errors import error_from_status

    err = from_triton(error_from_status(None, message))
    assert (err.status, err.code) == (status, code)
    if status == 503:
        assert err.headers.get("Retry-After")


def test_key_file_plain_hashed_options_and_constant_time_check(tmp_path):
    key = "sk-test-0123456789abcdef"
    hashed = "sk-hashed-key-000000000"
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n{key} name=alpha max_concurrent=2 requests_per_s=0.5\n\n"
                 f"sha256:{hashlib.sha256(hashed.encode()).hexdigest()}\n")
    store = KeyStore(f)
    assert store.check(f"Bearer {key}").name == "alpha"
    assert store.check(f"Bearer {hashed}").name.startswith("key-")
    assert store.check("Bearer sk-wrong") is None and store.check(None) is None
    assert store.check(f"Basic {key}") is None and store.check("Bearer ") is None
    limits = store.limits_for(store.check(f"Bearer {key}"), Limits(max_concurrent=8, burst=3))
    assert (limits.max_concurrent, limits.requests_per_s, limits.burst) == (2, 0.5, 3)
    # the file is re-read when it changes (key rotation without a restart)
    f.write_text("sk-rotated-key-0000000\n")
    assert store.check(f"Bearer {key}") is None and store.check("Bearer sk-rotated-key-0000000") is not None
    assert KeyStore(None).check(None).name == "anonymous"


@pytest.mark.parametrize("text,words", [
    ("", "holds no key"), ("sha256:abcd\n", "64 hex digits"), ("k1 colour=red\n", "unknown option"),
    ("k1 max_concurrent=x\n", "must be a number"), ("k1 burst=0\n", "must be > 0"), ("k1 oops\n", "name=value"),
])
def test_bad_key_files_say_what_is_wrong(text, words):
    with pytest.raises(KeyFileError) as err:
        parse_key_file(text, "keys.txt")
    assert words in str(err.value)


def test_token_bucket_and_concurrency_limit():
    now = [0.0]
    lim = Limiter(clock=lambda: now[0])
    rate = Limits(requests_per_s=2, burst=2)
    lim.acquire("k", rate).release()
    lim.acquire("k", rate).release()
    with pytest.raises(APIError) as err:
        lim.acquire("k", rate)
    assert err.value.status == 429 and err.value.code == "rate_limit_exceeded"
    assert err.value.headers["Retry-After"] == "1"
    now[0] += 0.5  # one token back
    lim.acquire("k", rate).release()
    lim.acquire("other", rate).release()  # buckets are per key
    conc = Limits(max_concurrent=1)
    lease = lim.acquire("k", conc)
    with pytest.raises(APIError) as err:
        lim.acquire("k", conc)
    assert err.value.code == "concurrency_limit_exceeded"
    lease.release()
    lease.release()  # idempotent
    assert lim.in_flight("k") == 0
    lim.acquire("k", conc).release()


def test_memory_cache_lru_ttl_and_bytes():
    now = [0.0]
    c = MemoryCache(ttl_s=10, max_entries=2, max_bytes=10_000, clock=lambda: now[0])

    async def go():
        await c.put("a", b"1")
        await c.put("b", b"2")
        assert await c.get("a") == b"1"  # a is now the most recent
        await c.put("c", b"3")  # evicts b, the least recently used
        assert await c.get("b") is None and await c.get("a") == b"1" and await c.get("c") == b"3"
        now[0] = 10.0
        assert await c.get("a") is None and c.entries() == 1
        small = MemoryCache(ttl_s=10, max_entries=100, max_bytes=1024, clock=lambda: now[0])
        for i in range(5):
            await small.put(str(i), b"x" * 300)
        assert small.entries() == 3  # 3 x 300 bytes fit in 1024
        await small.put("huge", b"x" * 2000)  # larger than the whole cache: not stored
        assert await small.get("huge") is None

    asyncio.run(go())


def test_cache_key_covers_model_versions_input_and_every_parameter():
    base = dict(model="ensemble", fingerprint="ensemble:1,generator:1", kind="chat",
                canonical_input='[{"role":"user","content":"Hi"}]', params={"max_tokens": 8, "temperature": 0.0})
    k = cache_key(**base)
    assert cache_key(**base) == k
    for change in (dict(model="other"), dict(fingerprint="ensemble:1,generator:2"), dict(kind="completion"),
                   dict(canonical_input='[{"role":"user","content":"Hi!"}]'),
                   dict(params={"max_tokens": 9, "temperature": 0.0}),
                   dict(params={"max_tokens": 8, "temperature": 0.0, "stop": ["x"]})):
        assert cache_key(**{**base, **change}) != k, change
    ans = CachedAnswer(["你好", "🙂"], "stop", 3, 4)
    assert CachedAnswer.from_bytes(ans.to_bytes()) == ans


def test_response_shapes():
    s = Shaper("chat", "m", "fp", include_usage=True)
    first = json.loads(s.chunk("Hi", None, 3, 1)[len(b"data: "):])
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    last = json.loads(s.chunk("", "stop", 3, 2)[len(b"data: "):])
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    u = json.loads(s.usage_chunk(3, 2)[len(b"data: "):])
    assert u["choices"] == [] and u["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    cont = Shaper("completion", "m", continuous_usage=True)
    c = json.loads(cont.chunk("a", None, 3, 1)[len(b"data: "):])
    assert c["object"] == "text_completion" and c["usage"]["completion_tokens"] == 1
    whole = Shaper("chat", "m").whole("Hello", "length", 3, 5)
    assert whole["choices"][0]["message"]["content"] == "Hello" and whole["usage"]["total_tokens"] == 8


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "gw.yaml"
    f.write_text("port: 9100\ncache: redis://127.0.0.1:6390/0\nlimits: {max_concurrent: 4}\n")
    cfg = load_config(f, port=9200, requests_per_s=3.0)
    assert cfg.port == 9200 and cfg.cache.startswith("redis://")
    assert cfg.limits.max_concurrent == 4 and cfg.limits.requests_per_s == 3.0 and cfg.limits.bucket_size() == 3
    assert GatewayConfig().cache_ttl_s == 1800 and GatewayConfig().model_names == ["ensemble"]
    with pytest.raises(ValidationError):
        GatewayConfig(cache="memcached://x")
    with pytest.raises(ValidationError):
        load_config(None, colour="red")

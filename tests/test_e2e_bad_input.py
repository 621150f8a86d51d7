"""A corpus of bad requests against the real tritonserver, over HTTP `generate`, HTTP
`generate_stream` and gRPC streaming: each one is answered with a client error that names the
field (HTTP 400; a gRPC stream carries no status code in Triton 2.51, so there: an error message),
and a valid request succeeds after each. What Triton's own HTTP JSON parser answers before any
model runs is pinned by the last test and listed in docs/contract.md."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CTX = 512  # stories260K's context in the test repository
LONG = "Once upon a time " * 200  # > 512 tokens, < the byte cap (16 per token of context)
OK = {"text_input": "Once upon a time", "max_tokens": 4}
chat = lambda msgs: json.dumps(msgs)  # noqa: E731

# (name, request fields over OK, what the error must say)
CASES = [
    ("empty prompt", {"text_input": ""}, "text_input is empty"),
    ("blank prompt", {"text_input": "   \n "}, "text_input is empty"),
    ("NUL in prompt", {"text_input": "Hi\u0000there"}, "'text_input' contains a NUL"),
    ("prompt over the byte cap", {"text_input": "a" * (16 * CTX + 1)}, "'text_input' is 8193 bytes"),
    ("prompt over the context", {"text_input": LONG}, "context is 512 tokens"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens must be > 0"),
    ("max_tokens negative", {"max_tokens": -3}, "max_tokens must be > 0"),
    ("max_tokens over the context", {"max_tokens": 100000}, "max_tokens 100000 exceeds the model's context"),
    ("min_tokens over max_tokens", {"max_tokens": 4, "min_tokens": 20}, "min_tokens 20 is larger than max_tokens"),
    ("min_tokens negative", {"min_tokens": -1}, "min_tokens must be >= 0"),
    ("temperature negative", {"temperature": -1.0}, "temperature must be >= 0"),
    ("top_p 0", {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ("top_p over 1", {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ("top_k negative", {"top_k": -2}, "top_k must be >= 0"),
    ("repetition_penalty 0", {"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ("repetition_penalty negative", {"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
    ("presence_penalty over 2", {"presence_penalty": 3.0}, "presence_penalty must be in [-2, 2]"),
    ("frequency_penalty under -2", {"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2]"),
    ("end_id outside the vocabulary", {"end_id": 9999}, "'end_id' must be in [0, 511]"),
    ("end_id negative", {"end_id": -1}, "'end_id' must be in [0, 511]"),
    ("pad_id outside the vocabulary", {"pad_id": 100000}, "'pad_id' must be in [0, 511]"),
    ("1,000 stop words", {"stop_words": ["a"] * 1000}, "'stop_words' has 1000 entries"),
    ("a 100 KB stop word", {"stop_words": ["b" * 100_000]}, "'stop_words' is 100000 bytes"),
    ("NUL in a stop word", {"stop_words": ["x\u0000"]}, "'stop_words' contains a NUL"),
    ("100 bad words", {"bad_words": ["c"] * 100}, "'bad_words' has 100 entries"),
    ("a 1 KB bad word", {"bad_words": ["d" * 1000]}, "'bad_words' is 1000 bytes"),
    ("chat: invalid JSON", {"text_input": "[{\"role\": \"user\"", "apply_chat_template": True}, "not valid JSON"),
    ("chat: empty list", {"text_input": "[]", "apply_chat_template": True}, "non-empty JSON list"),
    ("chat: unknown role", {"text_input": chat([{"role": "wizard", "content": "hi"}]), "apply_chat_template": True},
     "role 'wizard'"),
    ("chat: content not a string", {"text_input": chat([{"role": "user", "content": 5}]), "apply_chat_template": True},
     "needs a string 'content'"),
    ("chat: message not an object", {"text_input": chat(["hi"]), "apply_chat_template": True},
     "message 0 is not an object"),
]
HTTP_ONLY = [
    ("unknown input name", {"max_token": 5}, "unknown input 'max_token'"),
    ("missing max_tokens", {"max_tokens": None}, "max_tokens"),
    ("missing text_input", {"text_input": None}, "text_input"),
]
GRPC_ONLY = [  # what JSON cannot carry
    ("invalid UTF-8", {"text_input": b"\xff\xfeHi"}, "'text_input' is not valid UTF-8"),
    ("temperature NaN", {"temperature": float("nan")}, "temperature must be >= 0"),
    ("top_p NaN", {"top_p": float("nan")}, "top_p must be in (0, 1]"),
    ("presence_penalty inf", {"presence_penalty": float("inf")}, "presence_penalty must be in [-2, 2]"),
    ("two prompts in one request", {"text_input": [b"a", b"b"]}, "text_input"),
    ("unknown input name", {"bogus": 1}, "bogus"),
]

# Triton datatype of each contract input (gRPC)
TYPES = {"text_input": "BYTES", "max_tokens": "INT32", "min_tokens": "INT32", "top_k": "INT32", "end_id": "INT32",
         "pad_id": "INT32", "seed": "UINT64", "temperature": "FP32", "top_p": "FP32", "repetition_penalty": "FP32",
         "presence_penalty": "FP32", "frequency_penalty": "FP32", "stop_words": "BYTES", "bad_words": "BYTES",
         "stream": "BOOL", "apply_chat_template": "BOOL", "bogus": "INT32"}
NP = {"BYTES": object, "INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_}


def body(fields: dict) -> dict:
    out = {**OK, **fields}
    return {k: v for k, v in out.items() if v is not None}


def http(srv, path: str, fields: dict) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{srv.http_url}/v2/models/ensemble/{path}",
                                 data=json.dumps(body(fields)).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def grpc(srv, fields: dict, stream: bool = True):
    """(error message or None, text) of one gRPC streaming request."""
    import tritonclient.grpc as g

    inputs = []
    for name, value in {**body(fields), "stream": stream}.items():
        dt = TYPES[name]
        vals = value if isinstance(value, list) else [value]
        if dt == "BYTES":
            vals = [v if isinstance(v, bytes) else str(v).encode() for v in vals]
        arr = np.array([vals], dtype=NP[dt]) if name in ("stop_words", "bad_words") else \
            np.array(vals, dtype=NP[dt]).reshape(-1, 1)
        i = g.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    q = queue.Queue()
    client = g.InferenceServerClient(srv.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        try:
            client.async_stream_infer("ensemble", inputs, enable_empty_final_response=True)
        except Exception as exc:  # noqa: BLE001 - refused by the client library before sending
            return str(exc), ""
        text = ""
        while True:
            result, error = q.get(timeout=60)
            if error is not None:
                return str(error), text
            out = result.as_numpy("text_output")
            if out is not None:
                text += b"".join(out.reshape(-1)).decode()
            resp = result.get_response()
            if resp.parameters.get("triton_final_response") and resp.parameters["triton_final_response"].bool_param:
                return None, text
    finally:
        client.stop_stream()
        client.close()


def assert_serving(srv):
    code, text = http(srv, "generate", {})
    assert code == 200 and json.loads(text)["num_output_tokens"] == 4


@pytest.mark.parametrize("path", ["generate", "generate_stream"])
@pytest.mark.parametrize("name, fields, message", CASES + HTTP_ONLY, ids=[c[0] for c in CASES + HTTP_ONLY])
def test_http_bad_request_is_a_400_naming_the_field(stories_server, path, name, fields, message):
    if path == "generate_stream":
        fields = {**fields, "stream": True}
    code, text = http(stories_server, path, fields)
    assert code == 400, (code, text)
    assert message in text, text
    assert "Traceback" not in text and "/work/" not in text
    assert_serving(stories_server)


# the engine in the generator model, and in the entry's own process (generate: entry): the same checks,
# the error then the engine courier's final response
@pytest.mark.parametrize("server", ["stories_server", "engine_in_entry_server"])
@pytest.mark.parametrize("name, fields, message", CASES + GRPC_ONLY, ids=[c[0] for c in CASES + GRPC_ONLY])
def test_grpc_stream_bad_request_is_an_error_naming_the_field(request, server, name, fields, message):
    srv = request.getfixturevalue(server)
    error, _ = grpc(srv, fields)
    assert error is not None, name
    assert message in error, error
    assert "Traceback" not in error
    error, text = grpc(srv, {})
    assert error is None and text


@pytest.fixture(scope="module")
def engine_in_entry_server(tmp_path_factory):
    """stories260K with the engine in the entry's own process (`models.ensemble.generate: entry`)."""
    from e2e_helpers import generate_in_entry_repo
    from tritonchat.server import TritonServer

    with TritonServer(generate_in_entry_repo(tmp_path_factory)) as srv:
        yield srv


def test_the_corpus_is_large():
    assert 2 * len(CASES + HTTP_ONLY) + len(CASES + GRPC_ONLY) >= 85


# What Triton's own HTTP JSON parser does before any model sees the request (docs/contract.md,
# "Answered by Triton"); the OpenAI gateway validates these first and answers 400.
TRITON_PARSER = [
    ({"max_tokens": "5"}, 500, "Unable to parse"),
    ({"temperature": "hot"}, 500, "Unable to parse"),
    ({"stream": "yes"}, 500, "Unable to parse"),
    ({"text_input": 5}, 500, "Unable to parse"),
    ({"max_tokens": 4294967301}, 200, ""),  # wraps to 5 in Triton's INT32 conversion
]


@pytest.mark.parametrize("fields, code, message", TRITON_PARSER, ids=[json.dumps(f) for f, _, _ in TRITON_PARSER])
def test_what_tritons_json_parser_answers_before_any_model(stories_server, fields, code, message):
    got, text = http(stories_server, "generate", fields)
    assert got == code and message in text, (got, text)
    assert_serving(stories_server)

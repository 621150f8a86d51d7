"""Client tests that need no tritonserver: request building, SSE parsing, error mapping, refused
connections. Everything that needs a server runs against the real tritonserver
(tests/test_client_server.py, tests/test_e2e_stories.py)."""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
import pytest

from tritonchat.client import (ChatClient, GenerationParams, InvalidRequest, ModelNotFound,
                               RequestCancelled, RequestTimeout, ServerError, ServerUnavailable, TritonChatError,
                               build_arrays, build_grpc_inputs, build_json_body, error_from_exception,
                               error_from_http, error_from_status, normalize_url, parse_sse)
from tritonchat.client.sse import SSEParser
from tritonchat.client.cli_chat import format_summary, run_chat

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------
# request building


def test_defaults_send_only_required_tensors():
    arrays = build_arrays("Hello", GenerationParams())
    assert set(arrays) == {"text_input", "stream", "max_tokens"}
    assert arrays["text_input"].dtype == np.object_ and arrays["text_input"].shape == (1, 1)
    assert arrays["text_input"][0, 0] == b"Hello"
    assert arrays["stream"].dtype == np.bool_ and arrays["stream"][0, 0] == np.False_
    assert arrays["max_tokens"].dtype == np.int32 and arrays["max_tokens"].tolist() == [[128]]


def test_all_fields_names_dtypes_shapes():
    p = GenerationParams(max_tokens=7, temperature=0.5, top_k=40, top_p=0.9, repetition_penalty=1.1,
                         presence_penalty=0.2, frequency_penalty=0.3, seed=2 ** 63 + 5, min_tokens=2,
                         stop=["\n\n", "The end"], bad_words=["foo"], end_id=2,
                         exclude_input_in_output=False, apply_chat_template=True, pad_id=0)
    arrays = build_arrays("héllo", p, stream=True)
    expected = {
        "text_input": (np.object_, (1, 1)), "stream": (np.bool_, (1, 1)), "max_tokens": (np.int32, (1, 1)),
        "temperature": (np.float32, (1, 1)), "top_k": (np.int32, (1, 1)), "top_p": (np.float32, (1, 1)),
        "repetition_penalty": (np.float32, (1, 1)), "presence_penalty": (np.float32, (1, 1)),
        "frequency_penalty": (np.float32, (1, 1)), "seed": (np.uint64, (1, 1)), "min_tokens": (np.int32, (1, 1)),
        "stop_words": (np.object_, (1, 2)), "bad_words": (np.object_, (1, 1)), "end_id": (np.int32, (1, 1)),
        "pad_id": (np.int32, (1, 1)), "exclude_input_in_output": (np.bool_, (1, 1)),
        "apply_chat_template": (np.bool_, (1, 1)),
    }
    assert {k: (v.dtype.type, v.shape) for k, v in arrays.items()} == expected
    assert arrays["text_input"][0, 0] == "héllo".encode()
    assert arrays["seed"][0, 0] == np.uint64(2 ** 63 + 5)
    assert arrays["stop_words"].tolist() == [[b"\n\n", b"The end"]]
    assert arrays["temperature"][0, 0] == np.float32(0.5)
    assert bool(arrays["stream"][0, 0]) and not bool(arrays["exclude_input_in_output"][0, 0])


def test_grpc_infer_inputs():
    inputs = build_grpc_inputs("hi", GenerationParams(max_tokens=3, seed=1, stop=["a", "bc", "d"],
                                                      apply_chat_template=True), stream=True)
    got = {i.name(): (i.datatype(), i.shape()) for i in inputs}
    assert got == {"text_input": ("BYTES", [1, 1]), "stream": ("BOOL", [1, 1]), "max_tokens": ("INT32", [1, 1]),
                   "seed": ("UINT64", [1, 1]), "stop_words": ("BYTES", [1, 3]),
                   "apply_chat_template": ("BOOL", [1, 1])}
    raw = {i.name(): i._get_content() for i in inputs}
    assert raw["text_input"] == struct.pack("<I", 2) + b"hi"
    assert np.frombuffer(raw["max_tokens"], dtype=np.int32).tolist() == [3]
    assert np.frombuffer(raw["seed"], dtype=np.uint64).tolist() == [1]


def test_http_infer_inputs_flavour():
    import tritonclient.http as httpclient

    inputs = build_grpc_inputs("hi", GenerationParams(top_p=0.5), module=httpclient)
    assert {i.name(): i.datatype() for i in inputs}["top_p"] == "FP32"


def test_json_body():
    body = build_json_body("hi", GenerationParams(max_tokens=4, temperature=1, top_k=5, seed=9,
                                                  stop=["x"], exclude_input_in_output=True), stream=True)
    assert body == {"text_input": "hi", "stream": True, "max_tokens": 4, "temperature": 1.0, "top_k": 5,
                    "seed": 9, "stop_words": ["x"], "exclude_input_in_output": True}
    assert isinstance(body["temperature"], float)  # FP32 inputs always go as JSON numbers with a point
    json.dumps(body)


def test_params_normalisation_and_validation():
    assert "stop_words" not in build_arrays("x", GenerationParams(stop=[]))  # empty: not sent
    assert build_arrays("x", GenerationParams(stop="END"))["stop_words"].tolist() == [[b"END"]]
    with pytest.raises(InvalidRequest):
        build_arrays("x", GenerationParams(seed=-1))
    with pytest.raises(InvalidRequest):
        build_arrays("x", GenerationParams(top_k=1.5))
    with pytest.raises(InvalidRequest):
        build_arrays("x", GenerationParams(max_tokens=2 ** 40))
    with pytest.raises(InvalidRequest):
        build_arrays("x", GenerationParams(temperature="hot"))
    p = GenerationParams(max_tokens=5).replace(temperature=0.1)
    assert (p.max_tokens, p.temperature) == (5, 0.1)
    with pytest.raises(TypeError):
        GenerationParams().replace(nope=1)


def test_chat_prompt_is_sent_as_json():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é"}]
    arrays = build_arrays(msgs, GenerationParams(apply_chat_template=True))
    assert json.loads(arrays["text_input"][0, 0].decode()) == msgs
    with pytest.raises(InvalidRequest):
        build_arrays([{"content": "no role"}])


@pytest.mark.parametrize("url,protocol,expected", [
    (None, "grpc", "127.0.0.1:8001"), (None, "http", "127.0.0.1:8000"), ("localhost", "http", "localhost:8000"),
    ("http://h:9000/", "http", "h:9000"), ("h:1234", "grpc", "h:1234"), ("grpc://h", "GRPC", "h:8001"),
])
def test_normalize_url(url, protocol, expected):
    assert normalize_url(url, protocol) == expected


def test_bad_protocol():
    with pytest.raises(ValueError):
        ChatClient(protocol="websocket")


# --------------------------------------------------------------------------------------------
# SSE

# What Triton's generate_stream writes (one event per response, "data: " + JSON + "\n\n"; one-element
# tensors as JSON scalars), with an error as the last event.
RECORDED_SSE = (
    'data: {"model_name":"ensemble","model_version":"1","text_output":"Once","output_ids":412,'
    '"num_input_tokens":3,"num_output_tokens":1,"finish_reason":""}\n\n'
    'data: {"model_name":"ensemble","model_version":"1","text_output":" upon é","output_ids":[503,11],'
    '"num_input_tokens":3,"num_output_tokens":3,"finish_reason":""}\n\n'
    'data: {"error":"in ensemble \'ensemble\', max_tokens must be in [1, 2048], got 0"}\n\n'
).encode()


def test_sse_recorded_body_with_error_event():
    with pytest.raises(InvalidRequest) as info:
        parse_sse(RECORDED_SSE)
    assert "max_tokens must be in [1, 2048]" in info.value.message


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10 ** 6])
def test_sse_incremental_any_split(step):
    body = RECORDED_SSE.replace(b"\n", b"\r\n")  # CRLF line ends, split anywhere (mid UTF-8 too)
    parser = SSEParser()
    events = []
    for i in range(0, len(body), step):
        events.extend(parser.feed(body[i:i + step]))
    events.extend(parser.close())
    assert len(events) == 3
    from tritonchat.client.results import delta_from_json

    d0, d1 = (delta_from_json(json.loads(e)) for e in events[:2])
    assert (d0.text, d0.output_ids, d0.finish_reason, d0.num_output_tokens) == ("Once", [412], None, 1)
    assert (d1.text, d1.output_ids, d1.num_input_tokens) == (" upon é", [503, 11], 3)
    assert json.loads(events[2]) == {"error": "in ensemble 'ensemble', max_tokens must be in [1, 2048], got 0"}


def test_sse_comments_multiline_and_unterminated_last_event():
    body = b": keep-alive\n\nevent: x\ndata: {\"a\":\ndata: 1}\n\ndata:{\"b\":2}"
    assert parse_sse([body[:5], body[5:]]) == [{"a": 1}, {"b": 2}]


# --------------------------------------------------------------------------------------------
# error mapping


class _FakeRpcError(Exception):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("status,message,cls", [
    ("StatusCode.INVALID_ARGUMENT", "top_p must be in (0, 1]", InvalidRequest),
    ("INVALID_ARGUMENT", "bad", InvalidRequest),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found", ModelNotFound),
    ("StatusCode.INVALID_ARGUMENT", "Request for unknown model: 'x' is not found", ModelNotFound),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnavailable),
    ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", ServerUnavailable),
    ("StatusCode.RESOURCE_EXHAUSTED", "queue full", ServerUnavailable),
    ("StatusCode.CANCELLED", "Locally cancelled by application!", RequestCancelled),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", RequestTimeout),
    ("StatusCode.INTERNAL", "boom", ServerError),
    ("StatusCode.UNIMPLEMENTED", "nope", ServerError),
    (None, "max_tokens must be >= 1", InvalidRequest),  # in-stream error: Triton drops the code
    (None, "Request for unknown model: 'nope' is not found", ModelNotFound),
    (None, "Exceeds maximum queue size", ServerUnavailable),
    # a model's process died: retry later (503), whether Triton names the stub or not, with any code
    (None, "Failed to process the request(s) for model 'generator', message: Stub process is not healthy.",
     ServerUnavailable),
    (None, "Stub process 'ensemble_0_0' is not healthy.", ServerUnavailable),
    ("StatusCode.INVALID_ARGUMENT", "Stub process 'ensemble_0_0' is not healthy.", ServerUnavailable),
    (400, "top_k must be >= 0", InvalidRequest), ("400", "bad", InvalidRequest),
    (400, "Request for unknown model: 'y' is not found", ModelNotFound),
    (404, "Request for unknown model: 'y' is not found", ModelNotFound),
    (503, "Exceeds maximum queue size", ServerUnavailable), (500, "oops", ServerError),
    (501, "unsupported", ServerError),
])
def test_error_from_status(status, message, cls):
    err = error_from_status(status, message)
    assert type(err) is cls
    assert err.message == message and str(err) == message


def test_error_from_exception_kinds():
    from tritonclient.utils import InferenceServerException
    import grpc

    e = error_from_exception(InferenceServerException("max_tokens must be >= 1", status="StatusCode.INVALID_ARGUMENT"))
    assert isinstance(e, InvalidRequest) and e.message == "max_tokens must be >= 1"
    assert e.status == "StatusCode.INVALID_ARGUMENT"
    assert isinstance(error_from_exception(InferenceServerException("x", status="404")), ModelNotFound)
    rpc = type("E", (_FakeRpcError, grpc.RpcError), {})(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert isinstance(error_from_exception(rpc), ServerUnavailable)
    assert isinstance(error_from_exception(ConnectionRefusedError(111, "refused")), ServerUnavailable)
    assert isinstance(error_from_exception(socket.timeout("timed out")), RequestTimeout)
    assert isinstance(error_from_exception(ValueError("?")), TritonChatError)
    assert all(issubclass(c, TritonChatError) for c in
               (InvalidRequest, ModelNotFound, ServerUnavailable, RequestCancelled, RequestTimeout, ServerError))
    assert isinstance(error_from_http(400, "x"), InvalidRequest)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_connection_refused(protocol):
    c = ChatClient(f"127.0.0.1:{_free_port()}", protocol=protocol, timeout=10)
    with pytest.raises(ServerUnavailable):
        c.generate("Hi")
    with pytest.raises(ServerUnavailable):
        list(c.stream("Hi"))
    h = c.health()
    assert not h and not h.live
    with pytest.raises(ServerUnavailable):
        c.wait_ready(timeout=0.3, interval=0.1)
    c.close()


def test_run_chat_connection_and_argument_errors():
    assert run_chat("Hi", url=f"127.0.0.1:{_free_port()}", protocol="http") == 1
    assert run_chat("Hi", url=f"127.0.0.1:{_free_port()}", protocol="grpc") == 1
    assert run_chat("Hi", protocol="carrier-pigeon") == 2


def test_format_summary():
    s = format_summary("stop", 5, 11, 0.0, 0.1, 1.1, True)
    assert s.startswith("finish=stop · 5 prompt + 11 output tokens · TTFT 0.100 s · 10.0 tok/s")
    assert "TTFT" not in format_summary("length", 5, 10, 0.0, None, 2.0, False)

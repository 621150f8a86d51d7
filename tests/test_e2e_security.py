"""A locked door (issue 15, item 6), against the real tritonserver run by `tritonchat serve`.

Before: HTTP, gRPC and metrics listened on every interface and anyone could run inference, POST
/v2/logging, register system shared memory or read /v2/repository/index. Now serve binds 127.0.0.1 by
default; with --api-key-file inference needs ``authorization: Bearer <key>``, and with --admin-key-file the
repository, shared-memory, statistics, trace and logging APIs need ``admin-key: <key>`` (over gRPC the
same names with Triton's ``triton-grpc-protocol-`` prefix). What Triton answers a request without the key
(asserted here, documented in docs/operations.md): HTTP 403 ``This API is restricted, expecting header
'authorization'``; gRPC UNAVAILABLE ``This protocol is restricted, expecting header ...``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import urllib.error
import urllib.request

import pytest
from serve_helpers import TRITONCHAT, Serve, echo_repo, http_status

from tritonchat.security import GRPC_HEADER_PREFIX

pytestmark = pytest.mark.slow

API_KEY = "tc-api-7f3a9c51d2e84b06"
ADMIN_KEY = "tc-admin-0b5e2d8c4a7f9316"
API = {"authorization": f"Bearer {API_KEY}"}
ADMIN = {"admin-key": ADMIN_KEY}
GRPC_API = {GRPC_HEADER_PREFIX + "authorization": f"Bearer {API_KEY}"}
GRPC_ADMIN = {GRPC_HEADER_PREFIX + "admin-key": ADMIN_KEY}
REFUSED_HTTP = "This API is restricted, expecting header"
REFUSED_GRPC = "This protocol is restricted, expecting header"


def key_file(path, key: str):
    path.write_text(f"# tritonchat key (one key; lines starting with # are comments)\n\n  {key}  \n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return key_file(root / "api.key", API_KEY), key_file(root / "admin.key", ADMIN_KEY)


@pytest.fixture(scope="module")
def locked(stories_repo, keys, tmp_path_factory):
    srv = Serve(stories_repo, tmp_path_factory.mktemp("locked"), "--api-key-file", keys[0],
                "--admin-key-file", keys[1])
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def call(srv: Serve, method: str, path: str, headers=None, body=None):
    """(status, body text) of one HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{srv.http_url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def listeners(port: int):
    """Addresses with a listening TCP socket on `port` (IPv4 and IPv6), read from /proc/net."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr_hex)
            raw = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw) // 4}I", raw))
            addr = socket.inet_ntop(family, raw)
            found.append(addr[len("::ffff:"):] if addr.startswith("::ffff:") else addr)  # gRPC: IPv4-mapped
    return found


def test_http_grpc_and_metrics_listen_on_loopback_only_by_default(locked):
    for port in (locked.http_port, locked.grpc_port, locked.metrics_port):
        assert listeners(port) == ["127.0.0.1"], (port, listeners(port))


GENERATE = {"text_input": "Once upon a time", "max_tokens": 4}


@pytest.mark.parametrize("endpoint", ["generate", "generate_stream"])
def test_http_inference_needs_the_api_key(locked, endpoint):
    path = f"/v2/models/ensemble/{endpoint}"
    for headers in (None, ADMIN, {"authorization": API_KEY}, {"authorization": "Bearer wrong-key-0123456789"}):
        status, text = call(locked, "POST", path, headers, GENERATE)
        assert status == 403 and REFUSED_HTTP in text and "'authorization'" in text, (headers, status, text)
    status, text = call(locked, "POST", path, API, GENERATE)
    assert status == 200 and "text_output" in text
    # metadata and config are for clients with the API key too (perf_analyzer, GenAI-Perf read them first)
    assert call(locked, "GET", "/v2/models/ensemble")[0] == 403
    assert call(locked, "GET", "/v2/models/ensemble/config", API)[0] == 200


ADMIN_CALLS = [
    ("POST", "/v2/logging", {"log_verbose_level": 1}),
    ("POST", "/v2/systemsharedmemory/region/tc/register", {"key": "/tc", "offset": 0, "byte_size": 64}),
    ("POST", "/v2/repository/index", {}),
    ("POST", "/v2/repository/models/ensemble/unload", {}),
    ("GET", "/v2/models/stats", None),
    ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
]


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS, ids=[c[1] for c in ADMIN_CALLS])
def test_http_admin_apis_refuse_everyone_without_the_admin_key(locked, method, path, body):
    for headers in (None, API, {"admin-key": API_KEY}):
        status, text = call(locked, method, path, headers, body)
        assert status == 403 and REFUSED_HTTP in text and "'admin-key'" in text, (headers, status, text)


def test_http_admin_apis_answer_the_admin_key_and_nothing_was_changed(locked):
    status, text = call(locked, "POST", "/v2/repository/index", ADMIN, {})
    assert status == 200 and {e["name"]: e["state"] for e in json.loads(text)}["ensemble"] == "READY"
    status, text = call(locked, "GET", "/v2/logging", ADMIN)
    assert status == 200 and json.loads(text)["log_verbose_level"] == 0  # the refused POST changed nothing
    status, text = call(locked, "GET", "/v2/systemsharedmemory/status", ADMIN)
    assert status == 200 and json.loads(text) == []  # the refused registration did not happen
    assert call(locked, "GET", "/v2/models/stats", ADMIN)[0] == 200


def test_health_stays_open_for_probes(locked):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/ensemble/ready"):
        assert http_status(f"http://{locked.http_url}{path}") == 200, path
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(locked.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("ensemble")
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_chat_client_sends_the_key_and_is_refused_without_it(locked, protocol):
    from tritonchat.client import AccessDenied, ChatClient

    url = locked.grpc_url if protocol == "grpc" else locked.http_url
    with ChatClient(url, protocol=protocol, api_key="") as client:
        for call_ in (lambda: client.generate("Once upon a time", max_tokens=4),
                      lambda: list(client.stream("Once upon a time", max_tokens=4))):
            with pytest.raises(AccessDenied) as info:
                call_()
            assert (REFUSED_GRPC if protocol == "grpc" else REFUSED_HTTP) in info.value.message
            if protocol == "grpc":
                assert info.value.status == "StatusCode.UNAVAILABLE"  # what Triton 2.51 answers
    with ChatClient(url, protocol=protocol, api_key=API_KEY) as client:
        assert client.wait_ready(10)
        assert client.generate("Once upon a time", max_tokens=4).num_output_tokens == 4
        deltas = list(client.stream("Once upon a time", max_tokens=4))
        assert deltas[-1].finish_reason == "length"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_async_client_sends_the_key_too(locked, protocol):
    import asyncio

    from tritonchat.client import AccessDenied, AsyncChatClient

    url = locked.grpc_url if protocol == "grpc" else locked.http_url

    async def go():
        async with AsyncChatClient(url, protocol=protocol, api_key="") as client:
            with pytest.raises(AccessDenied):
                await client.generate("Once upon a time", max_tokens=4)
        async with AsyncChatClient(url, protocol=protocol, api_key=API_KEY) as client:
            assert (await client.generate("Once upon a time", max_tokens=4)).num_output_tokens == 4
            async with client.stream("Once upon a time", max_tokens=4) as stream:
                deltas = [d async for d in stream]
            assert deltas[-1].finish_reason == "length"

    asyncio.run(go())


def test_grpc_admin_apis_refuse_the_api_key_and_answer_the_admin_key(locked):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(locked.grpc_url)
    calls = {
        "repository index": lambda h: client.get_model_repository_index(headers=h),
        "logging": lambda h: client.update_log_settings({"log_verbose_level": 1}, headers=h),
        "statistics": lambda h: client.get_inference_statistics(headers=h),
        "shared memory": lambda h: client.register_system_shared_memory("tc", "/tc", 64, headers=h),
        "trace": lambda h: client.get_trace_settings(headers=h),
    }
    try:
        for name, fn in calls.items():
            for headers in (None, GRPC_API):
                with pytest.raises(InferenceServerException) as info:
                    fn(headers)
                assert REFUSED_GRPC in info.value.message() and "admin-key" in info.value.message(), name
        assert {m.name for m in client.get_model_repository_index(headers=GRPC_ADMIN).models} >= {"ensemble"}
        assert client.get_log_settings(headers=GRPC_ADMIN, as_json=True)["settings"]["log_verbose_level"][
            "uint32_param"] == 0
        with pytest.raises(InferenceServerException):
            client.get_server_metadata()  # metadata: API key
        assert client.get_server_metadata(headers=GRPC_API).name == "triton"
    finally:
        client.close()


def test_tritonchat_chat_takes_the_key_from_the_environment_or_the_option(locked):
    env = {k: v for k, v in os.environ.items() if k != "TRITONCHAT_API_KEY"}
    base = [str(TRITONCHAT), "chat", "Once upon a time", "--max-tokens", "4", "--raw"]
    grpc = base + ["--url", locked.grpc_url]
    refused = subprocess.run(grpc, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "AccessDenied" in refused.stderr and "TRITONCHAT_API_KEY" in refused.stderr
    ok = subprocess.run(grpc, env={**env, "TRITONCHAT_API_KEY": API_KEY}, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    http = base + ["--url", locked.http_url, "--protocol", "http", "--api-key", API_KEY]
    ok = subprocess.run(http, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_keys_never_appear_in_what_serve_prints(locked, keys):
    assert API_KEY not in locked.log() and ADMIN_KEY not in locked.log()
    assert "<api key>" in locked.err()  # the command line is shown, redacted
    out = subprocess.run([str(TRITONCHAT), "serve", "--model-repository", str(locked.repo), "--print-command",
                          "--api-key-file", str(keys[0]), "--admin-key-file", str(keys[1])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert API_KEY not in out.stdout + out.stderr and ADMIN_KEY not in out.stdout + out.stderr
    assert "--http-restricted-api=inference,metadata,model-config:authorization=Bearer <api key>" in out.stdout
    assert "--grpc-restricted-protocol=model-repository,shared-memory,statistics,trace,logging:admin-key=<admin key>" \
        in out.stdout


def test_an_api_key_alone_closes_the_admin_apis_to_everyone(tmp_path, keys):
    srv = Serve(echo_repo(tmp_path / "repo", "echo"), tmp_path / "serve", "--api-key-file", keys[0])
    try:
        srv.start()  # the supervisor reads the repository index with the random admin key: it must work
        for headers in (None, API, ADMIN):
            assert call(srv, "POST", "/v2/repository/index", headers, {})[0] == 403
        body = {"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [2.0]}]}
        assert call(srv, "POST", "/v2/models/echo/infer", None, body)[0] == 403
        assert call(srv, "POST", "/v2/models/echo/infer", API, body)[0] == 200
        assert "closed (no --admin-key-file)" in srv.err()
    finally:
        srv.stop()


@pytest.mark.parametrize("content,problem", [
    ("# only a comment\n\n", "holds no key"),
    (f"{API_KEY}\n{ADMIN_KEY}\n", "holds 2 keys"),
    ("short-key\n", "use at least 16"),
    ("a key with spaces in it\n", "characters a header cannot carry"),
])
def test_a_bad_key_file_is_refused_with_the_reason(tmp_path, content, problem):
    bad = tmp_path / "bad.key"
    bad.write_text(content)
    out = subprocess.run([str(TRITONCHAT), "serve", "--model-repository", str(tmp_path), "--print-command",
                          "--api-key-file", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and problem in out.stderr and str(bad) in out.stderr, out.stderr


def test_the_same_key_for_both_is_refused(tmp_path, keys):
    out = subprocess.run([str(TRITONCHAT), "serve", "--model-repository", str(tmp_path), "--print-command",
                          "--api-key-file", str(keys[0]), "--admin-key-file", str(keys[0])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "must differ" in out.stderr


def test_host_0000_exposes_every_port_and_warns_without_a_key(tmp_path):
    srv = Serve(echo_repo(tmp_path / "repo", "echo"), tmp_path / "serve", "--host", "0.0.0.0")
    try:
        srv.start()
        for port in (srv.http_port, srv.grpc_port, srv.metrics_port):
            assert set(listeners(port)) <= {"0.0.0.0", "::"} and listeners(port), (port, listeners(port))
        assert "listening on 0.0.0.0 without --api-key-file" in srv.err()
    finally:
        srv.stop()

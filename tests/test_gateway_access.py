"""Keys and limits of the real gateway process (in front of the real tritonserver), through the official
`openai` SDK: a wrong key is an AuthenticationError, limits are RateLimitError with Retry-After, and
no key ever reaches the gateway's log."""

from __future__ import annotations

import hashlib
import http.client
import json
import time

import pytest

from e2e_helpers import STORIES, need

pytestmark = pytest.mark.slow

KEY_A = "sk-alpha-5f2c9e1b7d3a4c6e"  # at most 1 request in flight
KEY_B = "sk-bravo-0a9b8c7d6e5f4a3b"  # 1 request per second, bursts of 2; stored as its SHA-256
KEY_C = "sk-charlie-99887766554433"  # no limits
WRONG = "sk-wrong-1111222233334444"


@pytest.fixture(scope="module")
def gateway(stories_server, tmp_path_factory):
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess

    need(STORIES)
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test keys\n{KEY_A} name=alpha max_concurrent=1\n"
                    f"sha256:{hashlib.sha256(KEY_B.encode()).hexdigest()} name=bravo requests_per_s=1 burst=2\n"
                    f"{KEY_C}\n")
    cfg = GatewayConfig(triton_url=stories_server.grpc_url, port=0, api_key_file=keys, log_level="debug")
    with GatewayProcess(cfg) as gw:
        yield gw


def _client(gateway, key):
    import openai

    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0)


def _ask(client, **kw):
    return client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=4, **kw)


def test_keys_are_required_and_checked(gateway):
    import openai

    assert _ask(_client(gateway, KEY_A)).usage.completion_tokens == 4
    for key in (WRONG, KEY_A + "x", "Bearer"):
        with pytest.raises(openai.AuthenticationError) as err:
            _ask(_client(gateway, key))
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(gateway, WRONG).models.list()
    # no Authorization header at all (the SDK always sends one)
    conn = http.client.HTTPConnection(gateway.config.host, gateway.config.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b"{}", headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 401 and "didn't provide an API key" in body["error"]["message"]
    # the service endpoints stay open: probes and scrapers carry no key
    conn.request("GET", "/health/live")
    assert conn.getresponse().status == 200
    conn.close()


def test_request_rate_limit_is_a_rate_limit_error_with_retry_after(gateway):
    import openai

    client = _client(gateway, KEY_B)  # the key file holds only its digest
    time.sleep(2.1)  # a full bucket
    _ask(client)
    _ask(client)
    with pytest.raises(openai.RateLimitError) as err:
        _ask(client)
    assert err.value.status_code == 429 and err.value.body["code"] == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1
    time.sleep(1.1)  # one token back
    assert _ask(client).usage.completion_tokens == 4


def test_concurrency_limit_counts_a_stream_until_it_ends(gateway):
    import openai

    client = _client(gateway, KEY_A)
    stream = client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=500,
                                       stream=True, extra_body={"min_tokens": 500})
    next(iter(stream))  # the stream holds the key's one slot
    try:
        with pytest.raises(openai.RateLimitError) as err:
            _ask(client)
        assert err.value.body["code"] == "concurrency_limit_exceeded"
        assert _ask(_client(gateway, KEY_C)).usage.completion_tokens == 4  # other keys are not held back
    finally:
        stream.close()
    deadline = time.monotonic() + 10
    while True:  # the slot is given back once the gateway has seen the stream end
        try:
            assert _ask(client).usage.completion_tokens == 4
            break
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_no_key_reaches_the_log(gateway):
    log = gateway.log_text()
    assert "POST /v1/completions" in log  # the log is there, at debug level
    for secret in (KEY_A, KEY_B, KEY_C, WRONG):
        assert secret not in log
    assert "429 for alpha" in log or "429 for bravo" in log  # keys are named by their name

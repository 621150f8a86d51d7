"""Overload through the gateway: a server with one slot and a waiting line of one refuses what does not
fit, the gateway answers those requests 503 in OpenAI's shape with Retry-After (the SDK's
InternalServerError), the others get their full answers, and everything keeps serving."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from e2e_helpers import overload_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess
    from tritonchat.server import TritonServer

    repo = overload_repo(tmp_path_factory)
    with TritonServer(repo) as srv, GatewayProcess(GatewayConfig(triton_url=srv.grpc_url, port=0, cache="off")) as gw:
        yield gw


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_full_server_is_a_503_with_retry_after_and_the_gateway_keeps_serving(gateway, stream):
    import openai

    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="-", max_retries=0)

    def one(_):
        try:
            out = client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=400,
                                            stream=stream, extra_body={"min_tokens": 400})
            return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        except openai.APIStatusError as exc:
            return exc

    # 1 slot + 1 waiting + 1 in Triton's queue: some of 12 refused. (Six once all got their answers in a
    # full-suite run: stories260K's answers are short-lived, so six requests may not overlap on busy cores.)
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    answered = [r for r in results if isinstance(r, str)]
    # at least one answered in full, not two: six at once can all meet Triton's queue before an entry
    # instance pulls from it, and then only the queued one gets in (seen once on busy cores); holding the
    # rest back until the first one runs lets them arrive after it ends instead (also seen)
    assert refused and answered, results
    for exc in refused:
        assert exc.status_code == 503 and exc.body["code"] == "overloaded", (exc.status_code, exc.body)
        assert exc.response.headers["retry-after"] == "1"
        assert "queue" in exc.message.lower()
    assert client.completions.create(model="ensemble", prompt="Once upon a time",
                                     max_tokens=8).usage.completion_tokens == 8

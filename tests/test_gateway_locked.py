"""The gateway in front of a tritonserver locked with keys (tritonchat/security.py, as `tritonchat serve
--api-key-file --admin-key-file` starts it): it passes Triton's API key on every call; with the admin
key the cache reads versions from the repository index, without it from the models' metadata; without
Triton's key it answers 502 (a bad gateway: its operator's problem) and says why."""

from __future__ import annotations

import pytest

from e2e_helpers import STORIES, need

pytestmark = pytest.mark.slow

API_KEY = "triton-api-key-0123456789abcdef"
ADMIN_KEY = "triton-admin-key-fedcba9876543210"


@pytest.fixture(scope="module")
def locked(stories_repo, tmp_path_factory):
    from tritonchat.security import Access
    from tritonchat.server import TritonServer

    need(STORIES)
    keys = tmp_path_factory.mktemp("triton-keys")
    (keys / "api").write_text(API_KEY + "\n")
    (keys / "admin").write_text(ADMIN_KEY + "\n")
    access = Access.from_files(keys / "api", keys / "admin")
    with TritonServer(stories_repo, extra_args=access.server_args()) as srv:
        yield srv, keys


def _gateway(srv, **keys):
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess

    return GatewayProcess(GatewayConfig(triton_url=srv.grpc_url, port=0, **keys))


def _ask(gw):
    import openai

    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="-", max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="ensemble", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8, temperature=0)


@pytest.mark.parametrize("with_admin", [True, False], ids=["api+admin keys", "api key only"])
def test_the_gateway_passes_tritons_keys(locked, with_admin):
    srv, keys = locked
    extra = {"triton_admin_key_file": keys / "admin"} if with_admin else {}
    with _gateway(srv, triton_api_key_file=keys / "api", **extra) as gw:
        first, again = _ask(gw), _ask(gw)
        assert first.parse().usage.completion_tokens == 8
        assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
        fingerprint = first.parse().system_fingerprint
        assert "ensemble:1" in fingerprint and "generator:1" in fingerprint
        assert API_KEY not in gw.log_text() and ADMIN_KEY not in gw.log_text()


def test_without_tritons_key_the_gateway_says_502_and_why(locked):
    import openai

    srv, _ = locked
    with _gateway(srv) as gw:
        client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=4,
                                      extra_headers={"Cache-Control": "no-store"})
        assert err.value.status_code == 502 and "refused the gateway's credentials" in err.value.message

"""The gateway across a hot model update, and Chinese and emoji streamed exactly, on the real tritonserver
in explicit model-control mode.

Version 1 of the generator is stories260K; version 2 is the same model trained for a few seconds to
answer in Chinese and emoji (byte-fallback tokens: one character is three or four tokens), loaded
beside version 1 while the server runs, as `tritonchat deploy` does. The response cache must never
answer from version 1 once version 2 serves.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from e2e_helpers import STORIES, build_repo, memorize, need

pytestmark = pytest.mark.slow

MEMO = "你好，世界！🙂 我们一起学习中文。Hello 👋🏽 world. "
ANSWER = "世界！🙂 我们一起学习中文。Hello 👋🏽 "  # version 2's greedy answer to "你好，", up to the stop "world"
EVERY_TOKEN = {"generator": {"stream_interval_ms": 0, "stream_responses_per_s": 0}}  # responses split characters
EXPLICIT = ["--model-control-mode=explicit", "--load-model=*"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, gateway, live repository, the version-2 generator folder to stage)."""
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess
    from tritonchat.python_backend.manifest import MANIFEST, write_manifest
    from tritonchat.server import TritonServer

    need(STORIES)
    root = tmp_path_factory.mktemp("versions")
    repo = build_repo(STORIES, root / "repo", max_batch_size=4, models=EVERY_TOKEN)
    chinese = root / "chinese"
    shutil.copytree(STORIES, chinese)
    _teach(chinese, MEMO)
    v2 = build_repo(chinese, root / "repo-chinese", max_batch_size=4, models=EVERY_TOKEN) / "generator" / "1"
    # both versions may serve at once (the entry model calls the newest), as during a deployment
    cfg = repo / "generator" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "\nversion_policy: { all { } }\n")
    info = {k: v for k, v in json.loads((repo / MANIFEST).read_text()).items() if k != "files"}
    write_manifest(repo, info)
    with TritonServer(repo, extra_args=EXPLICIT) as srv, \
            GatewayProcess(GatewayConfig(triton_url=srv.grpc_url, port=0)) as gw:
        yield srv, gw, repo, v2


def _teach(model_dir: Path, text: str, steps: int = 150) -> None:
    """Train the tiny model in place to continue `text` greedily from the start of a sequence (BOS first:
    this byte-level text does not survive training without one)."""
    memorize(model_dir, text, steps, bos=True, repeat=4, max_ids=None, lr=3e-3)


def _client(gw):
    import openai

    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)


def _load_version_2(srv, repo: Path, v2: Path) -> None:
    import tritonclient.http as httpclient

    from tritonchat.python_backend.manifest import MANIFEST, write_manifest

    shutil.copytree(v2, repo / "generator" / "2")
    info = {k: v for k, v in json.loads((repo / MANIFEST).read_text()).items() if k != "files"}
    write_manifest(repo, info)
    client = httpclient.InferenceServerClient(srv.http_url)
    try:
        client.load_model("generator")
        deadline = time.monotonic() + 120
        while not (client.is_model_ready("generator", "2") and client.is_model_ready("generator", "1")):
            assert time.monotonic() < deadline, "generator version 2 did not become ready beside version 1"
            time.sleep(0.2)
    finally:
        client.close()


def test_a_new_version_never_gets_an_old_versions_cached_answer(served):
    srv, gw, repo, v2 = served
    client = _client(gw)
    ask = dict(model="ensemble", prompt="你好，", max_tokens=60, stop=["world"], temperature=0)
    first = client.completions.with_raw_response.create(**ask)
    again = client.completions.with_raw_response.create(**ask)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    old = first.parse().choices[0].text
    assert again.parse().choices[0].text == old

    _load_version_2(srv, repo, v2)
    fresh = client.completions.with_raw_response.create(**ask)
    assert fresh.headers["x-cache"] == "miss"
    new = fresh.parse().choices[0].text
    assert new != old and new == ANSWER, new  # version 2 answered, not version 1's cache
    chat = client.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "你好"}],
                                          max_tokens=8)
    assert "generator:2" in chat.system_fingerprint
    repeat = client.completions.with_raw_response.create(**ask)
    assert repeat.headers["x-cache"] == "hit" and repeat.parse().choices[0].text == new


@pytest.mark.parametrize("prompt", ["你好，", "🙂 我们", "Hello 👋🏽"])
def test_chinese_and_emoji_stream_exactly(served, prompt):
    """Every streamed piece is whole characters, and together they are the entry model's answer, byte
    for byte (runs after the update: version 2 answers in Chinese and emoji)."""
    from tritonchat.client import ChatClient

    srv, gw, _, _ = served
    with ChatClient(srv.grpc_url) as direct:
        ref = direct.generate(prompt, max_tokens=60, stop=["world"])
    client = _client(gw)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="ensemble", prompt=prompt, max_tokens=60, stop=["world"], stream=True,
        extra_headers={"Cache-Control": "no-store"})]
    assert "".join(pieces).encode("utf-8") == ref.text.encode("utf-8")
    if "\ufffd" not in ref.text:  # a byte run the model left unfinished decodes to U+FFFD, streamed or not
        assert not any("\ufffd" in p for p in pieces), pieces
    if prompt == "你好，":
        assert ref.text == ANSWER
        assert sum(1 for p in pieces if p) >= 2  # several responses, each ending where a character of 3-4 tokens did
    chat = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="ensemble", messages=[{"role": "user", "content": prompt}], max_tokens=60, stop="world",
        stream=True, extra_headers={"Cache-Control": "no-store"}))
    with ChatClient(srv.grpc_url) as direct:
        assert chat == direct.generate([{"role": "user", "content": prompt}], max_tokens=60, stop=["world"],
                                       apply_chat_template=True).text

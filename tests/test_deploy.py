"""Hot model update (`tritonchat deploy`) on the real tritonserver in explicit model-control mode.

Version 2 is stories260K trained for a few steps to say "the new model spoke", so each answer tells
which version wrote it. Streaming clients run through every switch: none may fail or lose tokens.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from e2e_helpers import STORIES, build_repo, memorize, need

PROMPT = "Once upon a time"
V1 = ", there was a little girl named Lily"  # stories260K's greedy answer
V2 = "the new model spoke"
TOKENS = 48  # min_tokens = max_tokens: every stream is as long as asked, whichever version serves it
ADMIN_KEY = "deploy-test-admin-key-0123456789"
API_KEY = "deploy-test-api-key-0123456789"
EXPLICIT = ["--model-control-mode=explicit", "--load-model=*"]
TRITONCHAT = [sys.executable, "-m", "tritonchat.cli"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def v2_repo(tmp_path_factory):
    """A second build whose only difference is the generator's weights."""
    need(STORIES)
    model = tmp_path_factory.mktemp("v2") / "model"
    shutil.copytree(STORIES, model)
    memorize(model, f"{PROMPT} {V2}. ")
    return build_repo(model, model.parent / "repo")


@pytest.fixture()
def live_repo(stories_repo, tmp_path):
    """A copy of the stories repository that a test may change (the session one is shared)."""
    return Path(shutil.copytree(stories_repo, tmp_path / "repo"))


def deploy(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(TRITONCHAT + ["deploy", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


class Traffic:
    """N threads sending one request after another until stopped; every outcome recorded with its times.
    `session()` makes one thread's client: a context manager whose value answers `send()` with
    dict(text, tokens, reason)."""

    def __init__(self, session, clients: int = 6):
        self.session, self.clients = session, clients
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self) -> None:
        with self.session() as send:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    answer = send()
                    self.results.append(dict(start=t0, end=time.monotonic(), **answer))
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    self.results.append(dict(start=t0, end=time.monotonic(), error=repr(exc)))

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.results)
        while len(self.results) < start + n:
            assert time.monotonic() < deadline, f"traffic stalled: {self.results[-3:]}"
            time.sleep(0.05)

    def between(self, lo: float, hi: float) -> list[dict]:
        return [r for r in self.results if lo <= r["start"] and r["end"] <= hi]


@contextlib.contextmanager
def grpc_session(url: str, api_key: str = ""):
    """Triton's streaming gRPC through tritonchat.client: min_tokens = max_tokens, so every answer is whole."""
    from tritonchat.client import ChatClient

    with ChatClient(url, protocol="grpc", timeout=60, api_key=api_key) as client:
        def send() -> dict:
            stream = client.stream(PROMPT, max_tokens=TOKENS, min_tokens=TOKENS)
            for _ in stream:
                pass
            done = stream.completion
            return dict(text=done.text, tokens=done.num_output_tokens, reason=done.finish_reason)

        yield send


@contextlib.contextmanager
def gateway_session(base_url: str):
    """The OpenAI gateway with the official SDK, streamed, past its response cache (Cache-Control: no-store)."""
    import openai

    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def send() -> dict:
        text, reason = "", None
        for chunk in sdk.completions.create(model="ensemble", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                            stream=True, extra_headers={"Cache-Control": "no-store"}):
            for choice in chunk.choices:
                text += choice.text or ""
                reason = choice.finish_reason or reason
        return dict(text=text, tokens=None, reason=reason)

    try:
        yield send
    finally:
        sdk.close()


def overlapping(results: list, old: str, new: str, lo: float, hi: float) -> list:
    """Streams of version `old` that ended after a stream of version `new` (both from the window) started."""
    window = [r for r in results if "error" not in r and lo <= r["end"] and r["start"] <= hi]
    first_new = min((r["start"] for r in window if which(r) == new), default=float("inf"))
    return [r for r in window if which(r) == old and r["end"] > first_new]


def which(result: dict) -> str:
    return "v2" if V2 in result["text"] else "v1" if result["text"].startswith(V1) else "?"


def metric(metrics_url: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_hot_update_and_rollback_under_streaming_traffic(live_repo, v2_repo, tmp_path):
    from tritonchat.python_backend.manifest import verify_model_dir
    from tritonchat.security import Access
    from tritonchat.server import TritonServer

    # inference and the admin APIs behind keys, as `tritonchat serve --api-key-file --admin-key-file` locks them
    key = []
    for name, value in (("admin", ADMIN_KEY), ("api", API_KEY)):
        (tmp_path / f"{name}.key").write_text(value + "\n")
        (tmp_path / f"{name}.key").chmod(0o600)
        key += [f"--{name}-key-file", str(tmp_path / f"{name}.key")]
    with TritonServer(live_repo, extra_args=EXPLICIT + Access(API_KEY, ADMIN_KEY).server_args()) as srv:
        url = srv.http_url
        refused = deploy("--url", url, "--rollback", check=False)
        assert refused.returncode == 1 and "--admin-key-file" in refused.stderr, refused.stderr
        refused = deploy("--url", url, "--version", "2", key[0], key[1], check=False)
        assert refused.returncode == 1 and "--api-key-file" in refused.stderr, refused.stderr

        with Traffic(lambda: grpc_session(srv.grpc_url, API_KEY)) as traffic:
            traffic.wait_for(10)
            t_switch = time.monotonic()
            out = deploy("--url", url, "--repo", str(live_repo), "--from", str(v2_repo), *key)
            t_switched = time.monotonic()
            assert "version 2 serving" in out.stderr, out.stderr
            traffic.wait_for(30)
            tokens_after_switch = metric(srv.metrics_url, "tritonchat_generated_tokens_total")
            t_back = time.monotonic()
            out = deploy("--url", url, "--repo", str(live_repo), "--rollback", *key)
            t_rolled = time.monotonic()
            assert "version 1 serving" in out.stderr, out.stderr
            traffic.wait_for(30)
        results = traffic.results

        failed = [r for r in results if "error" in r]
        assert not failed, f"{len(failed)} of {len(results)} streams failed: {failed[:3]}"
        short = [r for r in results if r["tokens"] != TOKENS or r["reason"] != "length"]
        assert not short, f"streams cut short by a switch: {short[:3]}"
        before = traffic.between(0, t_switch)
        on_v2 = traffic.between(t_switched, t_back)
        after = [r for r in results if r["start"] >= t_rolled]
        assert before and {which(r) for r in before} == {"v1"}
        assert on_v2 and {which(r) for r in on_v2} == {"v2"}, [r["text"][:40] for r in on_v2][:5]
        assert after and {which(r) for r in after} == {"v1"}, [r["text"][:40] for r in after][:5]
        # the old version's streams that were still running after the new version had begun to answer:
        # they ran through the drain, and finished whole (checked above) on the version they started on
        spanning = (overlapping(results, "v1", "v2", t_switch, t_back)
                    + overlapping(results, "v2", "v1", t_back, float("inf")))
        assert spanning, "no stream was in flight during a switch: the test proves nothing about draining"
        # the generator's metrics go on after the version that registered them first was unloaded
        assert metric(srv.metrics_url, "tritonchat_generated_tokens_total") > tokens_after_switch > 0
        print(f"\n{len(results)} streams, 0 failed; {len(spanning)} ran on through a drain")

    # the choice is on disk, the manifest still holds: a plain restart serves version 1 beside folder 2
    assert sorted(p.name for p in (live_repo / "generator").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert "versions: [1]" in (live_repo / "generator" / "config.pbtxt").read_text()
    verify_model_dir(live_repo / "generator")
    with TritonServer(live_repo) as srv:
        assert srv.model_ready("generator", "1") and not srv.model_ready("generator", "2")
        from tritonchat.client import ChatClient

        with ChatClient(srv.grpc_url, protocol="grpc") as client:
            assert client.generate(PROMPT, max_tokens=12).text.startswith(V1[:20])


def test_hot_update_and_rollback_through_the_gateway(live_repo, v2_repo):
    """The OpenAI gateway in front: streams through it never fail across a switch, and its response cache
    follows the version (a cached answer of version 1 is not served once version 2 answers)."""
    import openai
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess
    from tritonchat.server import TritonServer

    with TritonServer(live_repo, extra_args=EXPLICIT) as srv, \
            GatewayProcess(GatewayConfig(triton_url=srv.grpc_url, port=0)) as gw:
        sdk = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def cached() -> str:  # deterministic: the gateway caches it under the serving versions
            return sdk.completions.create(model="ensemble", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text

        assert cached().startswith(V1[:20]) and cached().startswith(V1[:20])
        with Traffic(lambda: gateway_session(gw.base_url), clients=4) as traffic:
            traffic.wait_for(8)
            t_switch = time.monotonic()
            deploy("--url", srv.http_url, "--repo", str(live_repo), "--from", str(v2_repo))
            t_switched = time.monotonic()
            traffic.wait_for(16)
            assert V2 in cached(), "the gateway served version 1's cached answer after the switch"
            t_back = time.monotonic()
            deploy("--url", srv.http_url, "--repo", str(live_repo), "--rollback")
            t_rolled = time.monotonic()
            traffic.wait_for(16)
            assert cached().startswith(V1[:20])
        sdk.close()
    results = traffic.results
    failed = [r for r in results if "error" in r]
    assert not failed, f"{len(failed)} of {len(results)} streams through the gateway failed: {failed[:3]}"
    assert {r["reason"] for r in results} <= {"length", "stop"}
    assert {which(r) for r in traffic.between(0, t_switch)} == {"v1"}
    assert {which(r) for r in traffic.between(t_switched, t_back)} == {"v2"}
    assert {which(r) for r in results if r["start"] >= t_rolled} == {"v1"}
    drained = (overlapping(results, "v1", "v2", t_switch, t_back)
               + overlapping(results, "v2", "v1", t_back, float("inf")))
    assert drained, "no stream through the gateway was in flight during a switch"
    print(f"\n{len(results)} streams through the gateway, 0 failed; {len(drained)} ran on through a drain")


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(live_repo, v2_repo):
    from tritonchat.client import ChatClient
    from tritonchat.server import TritonServer

    deploy("--url", "127.0.0.1:1", "--repo", str(live_repo), "--from", str(v2_repo), "--stage-only")
    onnx = live_repo / "generator" / "2" / "model.onnx"
    onnx.unlink()  # a hard link to v2_repo's file: replace, never write through it
    onnx.write_bytes(b"not a model")
    with TritonServer(live_repo, extra_args=EXPLICIT) as srv:
        out = deploy("--url", srv.http_url, "--repo", str(live_repo), "--version", "2", check=False)
        assert out.returncode == 1
        assert "version 2 did not load" in out.stderr and "Still serving: version 1" in out.stderr, out.stderr
        assert "manifest" in out.stderr, out.stderr  # the generator's own reason comes through
        with ChatClient(srv.grpc_url, protocol="grpc") as client:
            assert client.generate(PROMPT, max_tokens=12).text.startswith(V1[:20])
    assert "versions: [1]" in (live_repo / "generator" / "config.pbtxt").read_text()


def test_deploy_explains_a_server_not_in_explicit_mode(stories_server):
    out = deploy("--url", stories_server.http_url, "--version", "2", check=False)
    assert out.returncode == 1 and "--model-control-mode=explicit" in out.stderr, out.stderr


def test_stage_refuses_what_is_not_a_version(live_repo, v2_repo, tmp_path):
    from tritonchat.deploy import DeployError, stage_version

    other = Path(shutil.copytree(v2_repo, tmp_path / "other"))
    cfg = other / "generator" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size: 16", "max_batch_size: 8"))
    with pytest.raises(DeployError, match="max_batch_size: 16  ->  max_batch_size: 8"):
        stage_version(live_repo, other)
    cfg.write_text(cfg.read_text().replace("max_batch_size: 8", "max_batch_size: 16"))
    tok = other / "generator" / "1" / "tokenizer" / "tokenizer.json"
    data = json.loads(tok.read_text())
    data["added_tokens"] = data.get("added_tokens", []) + [{"id": 511, "content": "<x>", "special": True,
                                                            "single_word": False, "lstrip": False, "rstrip": False,
                                                            "normalized": False}]
    tok.unlink()
    tok.write_text(json.dumps(data))
    with pytest.raises(DeployError, match="not the tokenizer"):
        stage_version(live_repo, other)
    assert [p.name for p in (live_repo / "generator").iterdir() if p.name.isdigit()] == ["1"]


def test_stage_refuses_a_repository_whose_entry_runs_the_engine(tmp_path_factory, stories_repo):
    # generate: entry: the entry reads generator/1 once at its start, so a generator version changes nothing
    from e2e_helpers import generate_in_entry_repo
    from tritonchat.deploy import DeployError, stage_version

    with pytest.raises(DeployError, match="runs the engine inside the `ensemble` model"):
        stage_version(generate_in_entry_repo(tmp_path_factory), stories_repo)

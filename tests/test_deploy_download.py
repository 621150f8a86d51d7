"""Model download for `tritonchat build --model <hub id>` (tritonchat/download.py): where requests go
(HF_ENDPOINT, a mirror), what a failure says, and that a local folder never touches the network.

No model hub or mirror can be reached from the machine these tests were written on; the real download
(and its resume) runs where one can: TRITONCHAT_HUB_TESTS=1."""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from e2e_helpers import STORIES, need


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request 404 and records its path: it shows where the client went, nothing more."""

    paths: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        Recorder.paths.append(self.path)
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture()
def mirror(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.paths = []
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def test_hf_endpoint_sends_the_download_to_the_mirror(mirror, tmp_path, monkeypatch):
    from tritonchat.download import DownloadError, download_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DownloadError) as err:
        download_model("some-org/some-model@v2")
    assert Recorder.paths and all("some-org/some-model" in p for p in Recorder.paths), Recorder.paths
    assert any("/revision/v2" in p for p in Recorder.paths), Recorder.paths
    message = str(err.value)
    assert "some-org/some-model" in message and mirror in message and "not found" in message


def test_an_unreachable_hub_says_what_to_try(tmp_path, monkeypatch):
    from tritonchat.download import DownloadError, download_model
    from tritonchat.server import free_ports

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    with pytest.raises(DownloadError, match="HF_ENDPOINT") as err:
        download_model("some-org/some-model")
    assert "resumes when you run the command again" in str(err.value)


def test_build_resolves_local_folders_without_the_network(monkeypatch):
    from tritonchat.build.pipeline import BuildError, resolve_model

    need(STORIES)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # would fail if it were asked
    assert resolve_model(str(STORIES)) == STORIES
    with pytest.raises(BuildError, match="neither a local folder nor a hub id"):
        resolve_model("./no/such/../folder")


@pytest.mark.skipif(os.environ.get("TRITONCHAT_HUB_TESTS") != "1",
                    reason="no model hub or mirror can be reached from this machine (huggingface.co does not "
                           "resolve); TRITONCHAT_HUB_TESTS=1 (with HF_ENDPOINT for a mirror) runs it where one can")
def test_real_download_then_offline_from_the_cache(tmp_path, monkeypatch):
    from tritonchat.download import download_model

    model = os.environ.get("TRITONCHAT_HUB_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = download_model(model)
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_model(model) == folder

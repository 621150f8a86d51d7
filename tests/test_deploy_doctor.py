"""`tritonchat doctor --url`: the 503 checklist against the real tritonserver (keys on, as `tritonchat serve`
locks it), healthy, without its keys, with a model unloaded, and with nothing there at all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from e2e_helpers import STORIES, need

pytestmark = pytest.mark.slow

API_KEY = "doctor-test-api-key-0123456789"
ADMIN_KEY = "doctor-test-admin-key-0123456789"


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritonchat.cli", "doctor", *args], capture_output=True, text=True,
                          timeout=300, env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})


def rows(out: str) -> dict:
    """{check: status} from the printed table."""
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) >= 3 and cells[1] in ("ok", "warn", "fail", "skip"):
            found[cells[0]] = cells[1]
    return found


@pytest.fixture(scope="module")
def keyed_server(stories_repo, tmp_path_factory):
    from tritonchat.security import Access
    from tritonchat.server import TritonServer

    need(STORIES)
    keys = tmp_path_factory.mktemp("keys")
    for name, key in (("api.key", API_KEY), ("admin.key", ADMIN_KEY)):
        (keys / name).write_text(key + "\n")
        (keys / name).chmod(0o600)
    args = ["--model-control-mode=explicit", "--load-model=*"] + Access(API_KEY, ADMIN_KEY).server_args()
    with TritonServer(stories_repo, extra_args=args) as srv:
        yield srv, ["--api-key-file", str(keys / "api.key"), "--admin-key-file", str(keys / "admin.key")]


def test_a_healthy_deployment_passes(keyed_server, stories_repo):
    srv, keys = keyed_server
    out = doctor("--url", srv.http_url, "--metrics-url", srv.metrics_url, "--repo", str(stories_repo), *keys)
    assert out.returncode == 0, out.stdout + out.stderr
    found = rows(out.stdout)
    for check in ("server reachable", "server ready", "model ensemble", "model generator",
                  "inference (Python stubs)", "metrics scrape", "overload", "CPUs", "shared memory",
                  "disk (repository)"):
        assert found.get(check) == "ok", (check, out.stdout)
    assert "The deployment answers." in out.stdout


def test_missing_keys_are_named(keyed_server):
    srv, _ = keyed_server
    out = doctor("--url", srv.http_url, "--metrics-url", srv.metrics_url)
    assert out.returncode == 1
    found = rows(out.stdout)
    assert found["inference (Python stubs)"] == "fail" and found["models"] == "warn", out.stdout
    assert "inference needs the API key: pass --api-key-file" in out.stdout
    assert "pass --admin-key-file" in out.stdout


def test_an_unloaded_model_fails_with_its_fix(keyed_server):
    import tritonclient.http as httpclient
    from tritonchat.security import key_headers

    srv, keys = keyed_server
    admin = httpclient.InferenceServerClient(srv.http_url)
    headers = key_headers("http", admin_key=ADMIN_KEY)
    admin.unload_model("generator", headers=headers)
    try:
        out = doctor("--url", srv.http_url, "--metrics-url", srv.metrics_url, *keys)
        assert out.returncode == 1
        found = rows(out.stdout)
        assert found["model generator"] == "fail" and found["server ready"] == "fail", out.stdout
        assert "load it again (`tritonchat deploy --version N`)" in out.stdout, out.stdout
    finally:
        admin.load_model("generator", headers=headers)
        admin.load_model("ensemble", headers=headers)
        admin.close()
    assert srv.model_ready("ensemble")


def test_nothing_there():
    from tritonchat.server import free_ports

    out = doctor("--url", f"127.0.0.1:{free_ports(1)[0]}")
    assert out.returncode == 1
    assert rows(out.stdout)["server reachable"] == "fail"
    assert "start it (`tritonchat serve`" in out.stdout

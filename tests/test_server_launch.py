"""The real tritonserver starts on a throwaway model repository, runs Python-backend models that import
this venv's packages, and a model that fails to load is reported with the server's own reason."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import BROKEN_MODEL

from tritonchat import install, server_log
from tritonchat import server as srv

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [
  { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "ORIGIN", data_type: TYPE_STRING, dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

ECHO_MODEL = """
import numpy as np
import tritonchat  # proves the stub sees the venv (editable install of this repo)
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.origin = np.array([tritonchat.__file__.encode()], dtype=np.object_)

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", (x * 2).astype(np.float32)),
                pb_utils.Tensor("ORIGIN", self.origin),
            ]))
        return out
"""

BROKEN_CONFIG = """
name: "broken"
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 1 ] } ]
"""

def write_model(repo: Path, name: str, config: str, model_py: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config).lstrip())
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py).lstrip())


def test_server_command_flags(tmp_path):
    cmd = srv.server_command(tmp_path, 18000, 18001, 18002, log_verbose=1, extra_args=["--id=x"])
    assert Path(cmd[0]).name == "tritonserver"
    joined = " ".join(cmd)
    for flag in (f"--model-repository={tmp_path}", "--backend-directory=", "--http-port=18000",
                 "--grpc-port=18001", "--metrics-port=18002", "--allow-metrics=true", "--exit-on-error=true",
                 "--strict-readiness=true", "--log-verbose=1"):
        assert flag in joined
    assert cmd[-1] == "--id=x"
    assert "--disable-auto-complete-config" not in joined


def test_install_backends_is_idempotent():
    first = install.install_backends()
    stub = first / "python" / install.STUB_NAME
    before = stub.stat().st_ino
    assert install.install_backends() == first
    assert stub.stat().st_ino == before  # not copied again
    assert install.check_stub(first) == []
    if install.locate_server().is_pytriton:  # the wheel is untouched: its backends folder has no stub
        assert not (install.locate_server().shipped_backends / "python" / install.STUB_NAME).exists()
        assert install.stub_python_version(stub) == install.python_tag()


def test_server_env_puts_venv_python_first():
    env = install.server_env({"PATH": "/usr/bin:/bin"})
    first = Path(env["PATH"].split(os.pathsep)[0])
    assert (first / "python3").exists()
    if install.locate_server().libs:
        assert str(install.locate_server().libs[0]) in env["LD_LIBRARY_PATH"]


def test_failure_reason_prefers_failed_loads():
    log = "\n".join([
        'E1121 20:11:57.971683 4044 server.cc:241] "CudaDriverHelper has not been initialized."',
        'E1121 20:12:00.100000 4044 model_lifecycle.cc:654] "failed to load \'generator\' version 1: '
        'Internal: ValueError: bad onnx"',
        "| generator | 1 | UNAVAILABLE: Internal: ValueError: bad onnx |",
    ])
    assert server_log.failure_reason(log) == "failed to load 'generator' version 1: Internal: ValueError: bad onnx"
    assert "CudaDriverHelper" not in server_log.failure_reason(log.splitlines()[0] + "\nerror: creating server: x")


def test_python_model_loads_and_answers(tmp_path):
    import tritonclient.http as httpclient

    import tritonchat

    repo = tmp_path / "repo"
    write_model(repo, "echo", ECHO_CONFIG, ECHO_MODEL)
    with srv.TritonServer(repo, startup_timeout=90) as server:
        assert server.process.poll() is None
        assert server.model_ready("echo")
        assert not server.model_ready("nope")
        assert server.metadata()["name"] == "triton"
        client = httpclient.InferenceServerClient(server.http_url)
        x = np.array([1.0, 2.5, -3.0], dtype=np.float32)
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("echo", [inp])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), x * 2)
        origin = result.as_numpy("ORIGIN")[0].decode()
        assert Path(origin).resolve() == Path(tritonchat.__file__).resolve()
        client.close()
        assert "echo" in server.log_text()
    assert server.process.poll() is not None


def test_failing_model_raises_with_reason(tmp_path):
    repo = tmp_path / "repo"
    write_model(repo, "broken", BROKEN_CONFIG, BROKEN_MODEL)
    with pytest.raises(srv.ServerStartError) as info:
        with srv.TritonServer(repo, startup_timeout=90):
            pytest.fail("the server must not become ready")
    message = str(info.value)
    assert "kaboom-4711" in message
    assert "broken" in message
    assert "kaboom-4711" in info.value.reason
    assert info.value.returncode not in (None, 0)


def test_serve_foreground_reports_failed_load(tmp_path, capfd):
    assert srv.serve_foreground(tmp_path / "missing", 0, 0, 0) == 2
    assert "does not exist" in capfd.readouterr().err

    repo = tmp_path / "repo"
    write_model(repo, "broken", BROKEN_CONFIG, BROKEN_MODEL)
    http, grpc, metrics = srv.free_ports(3)
    rc = srv.serve_foreground(repo, http, grpc, metrics)
    captured = capfd.readouterr()
    assert rc != 0
    assert "kaboom-4711" in captured.err and "broken" in captured.err  # the rich panel with the reason
    assert "kaboom-4711" in captured.out  # the server's own output passed through


def test_quickstart_finds_the_shared_model_through_the_environment(tmp_path, monkeypatch):
    """A clone outside the project folder (CI, a user's checkout) finds stories260K through
    $TRITONCHAT_SHARED (here a copy elsewhere, so the checkout's own ../shared cannot answer)."""
    import shutil

    from conftest import SHARED

    from tritonchat.quickstart import default_model

    if not (SHARED / "models" / "stories260K" / "config.json").exists():
        pytest.skip(f"stories260K not present under {SHARED}")
    copy = tmp_path / "elsewhere" / "models" / "stories260K"
    shutil.copytree(SHARED / "models" / "stories260K", copy)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRITONCHAT_SHARED", str(tmp_path / "elsewhere"))
    assert default_model() == str(copy.resolve())

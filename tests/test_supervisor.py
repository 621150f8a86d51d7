"""The supervisor of `tritonchat serve` (tritonchat/supervisor.py): what it reads from /proc, its restart
policy, and, with the real tritonserver on tiny Python models, that it gives up on a model that cannot
load again, passes the restart count to the new server, leaves tritonserver's own unloads alone and
watches models loaded later."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from serve_helpers import BROKEN_MODEL, Serve, alive, echo_repo, http_status

from tritonchat.supervisor import RestartPolicy, describe_status, find_stubs, process_state, scan_stubs

def infer(srv: Serve, model: str) -> int:
    body = json.dumps({"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [1.5]}]}).encode()
    return http_status(f"http://{srv.http_url}/v2/models/{model}/infer", data=body,
                       headers={"Content-Type": "application/json"})


def index(srv: Serve) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://{srv.http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return {(e["name"], e.get("version", "")): e.get("state", "") for e in json.load(resp)}


# ------------------------------------------------------------------------------------------- no server


def test_describe_status_reads_waitpid_and_popen_statuses():
    assert describe_status(9) == "killed by SIGKILL"
    assert describe_status(3 << 8) == "exited with code 3"
    assert describe_status(-11, waitpid=False) == "killed by SIGSEGV"
    assert describe_status(1, waitpid=False) == "exited with code 1"


def test_restart_delay_doubles_after_the_first_fast_failure_and_is_capped():
    p = RestartPolicy(backoff_s=1.0, backoff_max_s=5.0)
    assert [p.delay(n) for n in range(1, 7)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_dead_child_is_seen_as_a_zombie_with_its_status():
    child = subprocess.Popen(["sleep", "30"])
    try:
        # A child just forked may still be in "D" (uninterruptible, mid-exec) on a busy machine: only
        # "alive, not a zombie" is certain here.
        assert process_state(child.pid)[0] != "Z"
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_state(child.pid)[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_state(child.pid) == ("Z", signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert process_state(child.pid) is None


def test_a_stub_that_dies_with_its_dying_server_is_not_named_the_fault():
    """The stubs abort when tritonserver dies and can be seen dead first (Linux closes a dying
    process's files before it makes it a zombie): where the server does not answer its repository
    index, the supervisor waits up to SERVER_EXIT_GRACE_S for it and names the server. A server that
    stays up leaves the stub the fault. (A `sleep` stands in for the server process: nothing listens
    on its port, as on a dying server's.)"""
    import socket
    import threading

    from tritonchat.supervisor import SERVER_EXIT_GRACE_S, Stub, Supervisor, _Server

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sup = Supervisor(["true"], {}, f"127.0.0.1:{port}")
    stub = Stub(4242, "generator", "1", "generator_0_0")
    dying = subprocess.Popen(["sleep", "30"])
    try:
        threading.Timer(SERVER_EXIT_GRACE_S / 4, dying.kill).start()  # it exits a moment after its stub
        fault = sup._judge_dead_stub(_Server(dying, time.monotonic()), stub, signal.SIGABRT)
        assert fault == f"tritonserver (pid {dying.pid}) killed by SIGKILL", fault
    finally:
        dying.kill()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        fault = sup._judge_dead_stub(_Server(alive, time.monotonic()), stub, signal.SIGABRT)
        assert fault.startswith(stub.describe() + " killed by SIGABRT (and tritonserver did not answer"), fault
    finally:
        alive.kill()
        alive.wait()


def test_a_stub_that_died_unseen_is_found_by_its_command_name(tmp_path):
    """A zombie keeps no command line, only its command name ("triton_python_b", 15 characters): that and
    its status are enough to see a stub that died before the supervisor ever saw it alive."""
    import shutil

    fake = tmp_path / "triton_python_backend_stub"
    shutil.copy(shutil.which("sleep"), fake)
    child = subprocess.Popen([str(fake), "30"])
    try:
        deadline = time.monotonic() + 5
        while child.pid not in scan_stubs(os.getpid())[0] and time.monotonic() < deadline:
            time.sleep(0.02)  # until exec is done
        assert child.pid in scan_stubs(os.getpid())[0]
        os.kill(child.pid, signal.SIGKILL)
        while child.pid not in scan_stubs(os.getpid())[1] and time.monotonic() < deadline:
            time.sleep(0.02)
        alive, dead = scan_stubs(os.getpid())
        assert child.pid not in alive and dead[child.pid] == signal.SIGKILL
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------------------- real server


def test_a_model_that_cannot_load_after_a_restart_makes_serve_give_up(tmp_path):
    repo = echo_repo(tmp_path / "repo", "echo")
    srv = Serve(repo, tmp_path / "serve", "--max-restarts", "2", env={"ECHO_FAIL_AFTER_RESTART": "1"})
    try:
        srv.start()
        assert infer(srv, "echo") == 200
        stub = srv.stub_of("echo")
        assert stub.version == "1" and stub.instance.startswith("echo_")
        t0 = time.monotonic()
        os.kill(stub.pid, signal.SIGKILL)
        rc = srv.proc.wait(120)
        took = time.monotonic() - t0
        log = srv.err()
        assert rc == 1, log[-3000:]
        assert "giving up after 3 failures in a row" in log
        # each restart's server was told its count and why (the model's error carries them)
        assert "restarts=1 reason=Python backend stub of model 'echo' version 1" in log
        assert "restarts=2 reason=restart 1 failed" in log
        assert log.count("restarting tritonserver") == 2
        assert took < 60, f"gave up only after {took:.0f} s"
    finally:
        srv.stop()


def test_max_restarts_0_exits_at_the_first_fault(tmp_path):
    srv = Serve(echo_repo(tmp_path / "repo", "echo"), tmp_path / "serve", "--max-restarts", "0")
    try:
        srv.start()
        os.kill(srv.stub_of("echo").pid, signal.SIGKILL)
        assert srv.proc.wait(30) == 1
        assert "giving up: restarts are off (--max-restarts 0)" in srv.err()
        assert "restarting tritonserver" not in srv.err()
    finally:
        srv.stop()


def test_unloading_through_the_repository_api_is_not_a_fault_and_later_loads_are_watched(tmp_path):
    srv = Serve(echo_repo(tmp_path / "repo", "a", "b"), tmp_path / "serve")
    try:
        srv.start()
        stubs = find_stubs(srv.server_pid())
        assert sorted((s.model, s.version) for s in stubs.values()) == [("a", "1"), ("b", "1")]
        assert all(s.instance.startswith(f"{s.model}_") for s in stubs.values())
        old_b = srv.stub_of("b")
        assert http_status(f"http://{srv.http_url}/v2/repository/models/b/unload", data=b"{}") == 200
        deadline = time.monotonic() + 30
        while index(srv).get(("b", "1")) != "UNAVAILABLE" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # several watch rounds after the stub went
        assert "fault:" not in srv.err() and srv.proc.poll() is None
        assert infer(srv, "a") == 200
        assert old_b.pid not in srv.stubs()

        assert http_status(f"http://{srv.http_url}/v2/repository/models/b/load", data=b"{}", timeout=60) == 200
        assert infer(srv, "b") == 200
        new_b = srv.stub_of("b")
        time.sleep(1.5)  # found by the watcher's next scan
        os.kill(new_b.pid, signal.SIGKILL)
        srv.wait_log(rf"fault: Python backend stub of model 'b' version 1 \(instance {new_b.instance}, "
                     rf"pid {new_b.pid}\) killed by SIGKILL")
        srv.wait_log(r"recovered in \d+\.\d s \(restart 1", timeout=60)
        srv.wait_ready(60)
        assert infer(srv, "a") == 200 and infer(srv, "b") == 200  # every model is loaded again
    finally:
        srv.stop()


def test_a_model_that_fails_on_the_first_start_is_reported_without_restarts(tmp_path):
    srv = Serve(echo_repo(tmp_path / "repo", "broken", model_py=BROKEN_MODEL), tmp_path / "serve")
    try:
        srv.start(wait=False)
        rc = srv.proc.wait(120)
        assert rc not in (0, None)
        err = srv.err()
        assert "kaboom-4711" in err and "tritonserver did not start" in err
        assert "restarting" not in err
    finally:
        srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_sigint_and_sigterm(tmp_path, sig):
    srv = Serve(echo_repo(tmp_path / "repo", "echo"), tmp_path / "serve")
    try:
        srv.start()
        server, stubs = srv.server_pid(), list(srv.stubs())
        t0 = time.monotonic()
        srv.signal(sig)
        assert srv.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        assert f"shutdown ({signal.Signals(sig).name}): requests in flight: unknown" in srv.err()
        assert not alive(server) and not any(alive(p) for p in stubs)
    finally:
        srv.stop()


def test_killing_serve_itself_takes_tritonserver_down(tmp_path):
    """Even `kill -9` of serve leaves no server holding the ports (the kernel's parent-death signal)."""
    srv = Serve(echo_repo(tmp_path / "repo", "echo"), tmp_path / "serve")
    try:
        srv.start()
        server, stubs = srv.server_pid(), list(srv.stubs())
        srv.signal(signal.SIGKILL)
        srv.proc.wait(10)
        deadline = time.monotonic() + 30
        while (alive(server) or any(alive(p) for p in stubs)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(server), "tritonserver outlived serve"
        assert not any(alive(p) for p in stubs), "a stub outlived its server"
    finally:
        srv.stop()

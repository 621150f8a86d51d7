"""Faults fail fast and recover (issue 15, item 2), against the real tritonserver run by `tritonchat serve`.

Before the supervisor, ``kill -9`` of the generator stub left 12 of 12 streams silent for 60 s+ and
readiness 200 for 10 minutes. Here, for each stub (found by its command line, whatever the entry model
is), for the server process and for a hung server: every stream in flight gets an error within 2 s of the
fault (the hung server: of the liveness time-out), readiness goes false, the server answers again, and
serve's log says why and how long. Then: shutdown with 8 streams in flight ends in < 5 s.

The model is a seeded random Llama (hidden 256, 32k vocabulary) rather than stories260K: on CPU its
streams run for seconds, so they are surely in flight when the fault comes (stories260K finishes 480
tokens in about a second).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from e2e_helpers import build_repo, need
from serve_helpers import Serve, alive, http_status, start_streams

from conftest import SHARED

pytestmark = pytest.mark.slow

MAX_TOKENS = 900  # context 1024: ~9 s per stream with 8 running on 2 cores
LIVENESS_S = 3.0
PROTOCOLS = ["grpc"] * 4 + ["http"] * 4


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory):
    from tritonchat.build.synthetic import make_random_model

    need(SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    root = tmp_path_factory.mktemp("faults")
    model = make_random_model("llama", root / "hf", tokenizer="llama2", seed=1, layers=4, hidden=256, heads=4,
                              kv_heads=2, intermediate=512, max_positions=1024)
    return build_repo(model, root / "repo", max_batch_size=16)


@pytest.fixture(scope="module")
def serve(slow_repo, tmp_path_factory):
    srv = Serve(slow_repo, tmp_path_factory.mktemp("serve"), "--max-restarts", "10",
                "--liveness-timeout", str(LIVENESS_S))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _urls(srv: Serve) -> dict:
    return {"grpc": srv.grpc_url, "http": srv.http_url}


def _streams_in_flight(srv: Serve):
    runs = start_streams(_urls(srv), PROTOCOLS, MAX_TOKENS)
    for run in runs:
        assert run.first.wait(30), "a stream got no first text within 30 s"
    assert all(r.outcome == "" for r in runs), [(r.outcome, r.message) for r in runs]
    return runs


def _assert_fail_fast(runs, fault_at: float, within: float) -> None:
    for run in runs:
        run.thread.join(within + 10)
    ends = [(r.protocol, r.outcome, round(r.ended_at - fault_at, 2), r.message[:80]) for r in runs]
    assert all(r.outcome not in ("", "done") and not r.outcome.startswith("unexpected") for r in runs), ends
    assert all(r.tokens < MAX_TOKENS for r in runs), ends
    assert max(r.ended_at - fault_at for r in runs) < within, ends


def _assert_not_ready_then_recovered(srv: Serve, fault_at: float) -> float:
    # readiness false soon after the fault (nothing answers: connection refused), for server and model
    seen_down = None
    while time.monotonic() - fault_at < 5.0 and seen_down is None:
        if http_status(f"http://{srv.http_url}/v2/health/ready", 0.5) != 200 and \
                http_status(f"http://{srv.http_url}/v2/models/ensemble/ready", 0.5) != 200:
            seen_down = time.monotonic() - fault_at
        time.sleep(0.05)
    assert seen_down is not None, "readiness stayed 200 after the fault"
    srv.wait_ready(timeout=90)
    recovered = time.monotonic() - fault_at
    from tritonchat.client import ChatClient

    with ChatClient(srv.grpc_url) as client:
        assert client.generate("Once upon a time", max_tokens=4).num_output_tokens == 4
    return recovered


def _faults_so_far(srv: Serve) -> int:
    return len(re.findall(r"ERROR: fault: ", srv.err()))


def _assert_logged_and_counted(srv: Serve, why: str) -> None:
    faults = _faults_so_far(srv)
    m = srv.wait_log(rf"fault: [^\n]*{why}[\s\S]*recovered in (\d+\.\d) s \(restart {faults}, after: [^\n]*{why}")
    assert float(m.group(1)) < 90
    env = srv.server_env()  # the new server knows how often it was restarted and why (for its metrics)
    assert env["TRITONCHAT_SERVER_RESTARTS"] == str(faults)
    assert re.search(why, env["TRITONCHAT_RESTART_REASON"])


@pytest.mark.parametrize("model", ["preprocessing", "generator", "postprocessing"])
def test_a_killed_stub_fails_every_stream_within_2_s_and_the_server_recovers(serve, model):
    serve.wait_ready(90)
    runs = _streams_in_flight(serve)
    stub = serve.stub_of(model)
    fault_at = time.monotonic()
    os.kill(stub.pid, signal.SIGKILL)
    _assert_fail_fast(runs, fault_at, within=2.0)
    _assert_not_ready_then_recovered(serve, fault_at)
    _assert_logged_and_counted(serve, rf"stub of model '{model}' version 1 \(instance {stub.instance}, "
                                      rf"pid {stub.pid}\) killed by SIGKILL")


def test_a_killed_server_process_is_restarted(serve):
    serve.wait_ready(90)
    runs = _streams_in_flight(serve)
    pid = serve.server_pid()
    fault_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _assert_fail_fast(runs, fault_at, within=2.0)
    _assert_not_ready_then_recovered(serve, fault_at)
    _assert_logged_and_counted(serve, rf"tritonserver \(pid {pid}\) killed by SIGKILL")
    assert serve.server_pid() != pid


def test_a_hung_server_is_restarted_after_the_liveness_time_out(serve):
    serve.wait_ready(90)
    runs = _streams_in_flight(serve)
    pid = serve.server_pid()
    fault_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive but silent: /v2/health/live stops answering
    _assert_fail_fast(runs, fault_at, within=LIVENESS_S + 2.5)
    _assert_not_ready_then_recovered(serve, fault_at)
    _assert_logged_and_counted(serve, rf"tritonserver \(pid {pid}\) stopped answering /v2/health/live")
    assert not alive(pid)


def test_shutdown_with_streams_in_flight_ends_within_5_s(slow_repo, tmp_path):
    srv = Serve(slow_repo, tmp_path / "serve")
    try:
        srv.start()
        server = srv.server_pid()
        stubs = list(srv.stubs())
        runs = _streams_in_flight(srv)
        t0 = time.monotonic()
        srv.signal(signal.SIGTERM)
        rc = srv.proc.wait(10)
        took = time.monotonic() - t0
        assert took < 5.0, f"shutdown took {took:.1f} s:\n{srv.err()[-3000:]}"
        assert rc == 0
        for run in runs:  # every stream ended (cut off), none hangs
            run.thread.join(5)
            assert run.outcome not in ("",) and not run.outcome.startswith("unexpected"), run
            assert run.ended_at - t0 < 5.0
        assert not alive(server) and not any(alive(p) for p in stubs)
        m = re.search(r"shutdown \(SIGTERM\): (\d+) requests in flight \((\d+) running, (\d+) waiting\) are cut off",
                      srv.err())
        assert m and int(m.group(1)) >= 1, srv.err()[-3000:]
        assert re.search(r"shutdown: (tritonserver stopped in|killed tritonserver and its stubs after) \d+\.\d s",
                         srv.err())
    finally:
        srv.stop()

"""Overload through the real tritonserver: what does not fit the generator's slots and waiting line
waits in Triton's queue in front of the entry model; beyond that, Triton itself refuses at once with
UNAVAILABLE (HTTP 503), and the server keeps serving."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from e2e_helpers import overload_repo

pytestmark = pytest.mark.slow


# the engine in the generator model, or in the entry's own process (generate: entry): the same bounds
@pytest.fixture(scope="module", params=["generator", "entry"], ids=["generator-model", "generate-in-entry"])
def small_server(request, tmp_path_factory):
    from tritonchat.server import TritonServer

    repo = overload_repo(tmp_path_factory, generate=request.param)
    with TritonServer(repo) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_full_waiting_line_refuses_with_unavailable_and_the_server_keeps_serving(small_server, protocol):
    from tritonchat.client import ChatClient
    from tritonchat.client.errors import ServerUnavailable

    url = small_server.grpc_url if protocol == "grpc" else small_server.http_url

    def one(_):
        with ChatClient(url, protocol=protocol) as c:
            try:
                return c.generate("Once upon a time", max_tokens=400, min_tokens=400).text
            except ServerUnavailable as exc:
                return exc

    with cf.ThreadPoolExecutor(6) as pool:  # 1 slot + 1 waiting + 1 in Triton's queue: some of 6 are refused
        results = list(pool.map(one, range(6)))
    refused = [r for r in results if isinstance(r, ServerUnavailable)]
    answered = [r for r in results if isinstance(r, str)]
    # at least one answered in full, not two: six at once can all meet Triton's queue before an entry
    # instance pulls from it, and then only the queued one gets in (seen once on busy cores); holding the
    # rest back until the first one runs lets them arrive after it ends instead (also seen)
    assert refused and answered, results
    # refused by Triton's own queue in front of the entry (over HTTP a 503; a gRPC stream carries
    # no status code in Triton 2.51, only this message, which the client maps to ServerUnavailable)
    assert all("Exceeds maximum queue size" in str(e) for e in refused), refused
    with ChatClient(url, protocol=protocol) as c:  # and it still serves
        assert c.generate("Once upon a time", max_tokens=8).text


def test_http_overload_is_a_503_decided_at_once(small_server):
    """Beyond the waiting line: HTTP 503 in milliseconds (the issue's probe saw HTTP 400 after
    0.7 s); the running requests finish."""
    import json
    import time
    import urllib.error
    import urllib.request

    def post(_):
        t = time.perf_counter()
        req = urllib.request.Request(f"http://{small_server.http_url}/v2/models/ensemble/generate",
                                     data=json.dumps({"text_input": "Once upon a time", "max_tokens": 300,
                                                      "min_tokens": 300}).encode())
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, time.perf_counter() - t
        except urllib.error.HTTPError as e:
            return e.code, time.perf_counter() - t

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    refused = [s for code, s in results if code == 503]
    assert len(refused) >= 3 and sum(code == 200 for code, _ in results) >= 2, results
    assert max(refused) < 0.1, results  # decided by Triton's queue, before any work (~1-2 ms here)


def test_generator_logs_its_malloc_setting_and_scheduler_statistics(small_server):
    import re

    small_server.stop()  # last test of the module: the fixture's own stop then has nothing to do
    log = small_server.log_text()
    assert "malloc keeps freed memory: True" in log  # allocator.keep_freed_memory ran in the stub
    engine_in_entry = "(generate: entry)" in log
    # Triton 2.51 did not unload the entry model once its queue had refused requests (the server then
    # stopped by its exit timeout, 10 s; seen with either build): with the engine in the entry, the
    # finalize that logs the statistics did not run
    if engine_in_entry and "unloaded 'ensemble'" not in log:
        pytest.skip("the engine runs in the entry model, which this tritonserver did not unload after its queue "
                    "refused requests: no shutdown statistics to check (the generator-model run checks them)")
    line = re.search(rf"{'ensemble' if engine_in_entry else 'generator'}: scheduler (.*)", log)
    assert line, "no scheduler statistics in the server log"
    stats = {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line.group(1))}
    assert stats["finished"] >= 4 and stats["steps"] > 0 and stats["prefill_calls"] >= 1
    assert stats["avg_batch"] <= 1  # max_batch_size 1: one sequence at a time
    assert all(stats[k] >= 0 for k in ("prefill_s", "prefill_exec_s", "launch_s", "decode_wait_s", "bookkeeping_s",
                                       "idle_s"))
    # one slot served every request in turn: it stood empty between them, and requests queued for it
    assert stats["slot_gaps"] >= 3 and stats["slot_gap_ms_mean"] > 0 and stats["queue_ms_mean"] > 0
    # every response went through the courier: counted, with the time its sends took
    assert stats["sends"] >= stats["finished"] and stats["send_ms_mean"] > 0 and stats["send_lag_ms_mean"] > 0


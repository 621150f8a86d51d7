"""Overload through the real tritonserver: the generator's own waiting line (there is no Triton
dynamic batcher in front of it) refuses what does not fit with UNAVAILABLE and keeps serving."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from e2e_helpers import STORIES, build_repo, need

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    from tritonchat.server import TritonServer

    need(STORIES)
    repo = build_repo(STORIES, tmp_path_factory.mktemp("overload") / "repo", max_batch_size=1,
                      models={"generator": {"max_queue_size": 1}})
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

    with cf.ThreadPoolExecutor(6) as pool:  # 1 slot + 1 waiting: at least 4 of 6 are refused
        results = list(pool.map(one, range(6)))
    refused = [r for r in results if isinstance(r, ServerUnavailable)]
    answered = [r for r in results if isinstance(r, str)]
    assert len(answered) >= 2 and len(refused) >= 1, results
    assert all("generator queue is full (1 waiting requests); retry later" in str(e) for e in refused), refused
    with ChatClient(url, protocol=protocol) as c:  # and it still serves
        assert c.generate("Once upon a time", max_tokens=8).text


def test_generator_logs_its_malloc_setting_and_scheduler_statistics(small_server):
    import re

    small_server.stop()  # last test of the module: the fixture's own stop then has nothing to do
    log = small_server.log_text()
    assert "malloc keeps freed memory: True" in log  # allocator.keep_freed_memory ran in the stub
    line = re.search(r"generator: scheduler (.*)", log)
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

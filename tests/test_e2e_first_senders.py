"""First-token senders and the request timeline through the real tritonserver: with `first_token_senders` threads sending
first tokens beside the generator's courier (and every token its own response, no rate limit, so each stream's
later outputs queue behind its first), streams that start together still get every piece of their
text, in order: each streamed answer equals the same request answered in one piece. With
TRITONCHAT_TIMELINE set, every process marks each first token's way, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "Lily saw a big", "The cat", "One day, Tom", "The sun was", "Ben and Mia",
           "A little bird", "Sue wanted to", "Max had a red", "The dog ran", "Mom said", "There was a tree",
           "Spot liked to", "The girl", "A boy named", "In the park"]


@pytest.fixture(scope="module")
def timeline_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("timeline")


@pytest.fixture(scope="module")
def senders_server(tmp_path_factory, timeline_dir):
    from e2e_helpers import STORIES, build_repo, need
    from tritonchat.install import server_env
    from tritonchat.server import TritonServer

    need(STORIES)
    repo = build_repo(STORIES, tmp_path_factory.mktemp("senders") / "repo",
                      models={"generator": {"first_token_senders": 3, "gil_switch_ms": 0.5,
                                                 "stream_interval_ms": 0,
                                                 "stream_responses_per_s": 0}})
    with TritonServer(repo, env=dict(server_env(), TRITONCHAT_TIMELINE=str(timeline_dir))) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_streams_starting_together_get_their_whole_answers_in_order(senders_server, protocol):
    from tritonchat.client import AsyncChatClient

    url = senders_server.grpc_url if protocol == "grpc" else senders_server.http_url

    async def run():
        async with AsyncChatClient(url, protocol=protocol) as c:
            async def streamed(prompt):
                deltas = [d async for d in c.stream(prompt, max_tokens=40, min_tokens=40)]
                return "".join(d.text for d in deltas), [i for d in deltas for i in d.output_ids], len(deltas)

            streams = await asyncio.gather(*[streamed(p) for p in PROMPTS])
            whole = [await c.generate(p, max_tokens=40, min_tokens=40) for p in PROMPTS]
        return streams, whole

    streams, whole = asyncio.run(run())
    for prompt, (text, ids, pieces), one in zip(PROMPTS, streams, whole):
        assert text == one.text, prompt
        assert ids == list(one.output_ids), prompt
        assert pieces >= 3, prompt  # a first token, deltas, a final: not one piece
    assert "first-token senders 3, GIL switch interval 0.5 ms," in senders_server.log_text()


def test_the_timeline_marks_each_first_token_in_order(senders_server, timeline_dir):
    """Every process of the way writes its marks (entry, generator, courier or first-token sender),
    and for every request they come in the order of its first token's way; benchmarks/timeline.py
    reads them."""
    import sys

    from tritonchat.client import ChatClient

    with ChatClient(senders_server.grpc_url) as c:
        for p in PROMPTS[:4]:
            assert "".join(d.text for d in c.stream(p, max_tokens=8))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import timeline as bench

    marks = bench.load(timeline_dir)
    order = bench.ORDER
    done = [m for rid, m in marks.items() if rid.startswith("tc-") and set(order) | {"send_end"} <= set(m)]
    assert len(done) >= 4
    for m in done:
        times = [m[k] for k in order]
        assert times == sorted(times) and m["send_end"] >= m["send_start"], m
    assert len({p.name for p in timeline_dir.glob("*.txt")}) >= 2  # the entry's and the generator's processes
    # a first token due within the entry's cancel_poll_ms (20) goes out without asking the server first
    quick = [m for m in done if m["entry_sent"] - m["entry_start"] < 0.015]
    assert quick and all(m.get("entry_poll", float("inf")) > m["entry_sent"] for m in quick), quick
    lines = bench.report(marks)
    assert any(line.split()[:3] == ["posted", "->", "send_start"] for line in lines), lines

"""The gateway's Triton side (gateway/upstream.py) against the real tritonserver: a gRPC stream carries
one request after another (a "lane"); a request cancelled or timed out drops its stream, and the next
request still gets its whole answer."""

from __future__ import annotations

import asyncio

import pytest

from tritonchat.client import GenerationParams
from tritonchat.client.errors import RequestTimeout
from tritonchat.gateway.upstream import Upstream

pytestmark = pytest.mark.slow
PROMPT = "Once upon a time"


async def _answer(up: Upstream, n: int = 12) -> tuple[str, int]:
    text, tokens = "", 0
    async for d in up.stream(PROMPT, GenerationParams(max_tokens=n, min_tokens=n)):
        text += d.text or ""
        tokens = d.num_output_tokens or tokens
    return text, tokens


def test_streams_are_reused_and_dropped_when_a_request_does_not_finish(stories_server):
    async def run():
        up = Upstream(stories_server.grpc_url, "ensemble", None, timeout_s=60.0)
        try:
            first = await _answer(up)
            assert first[1] == 12 and len(up._lanes) == 1
            lane = up._lanes[0]
            for _ in range(5):  # one after another: the same stream every time
                assert await _answer(up) == first
                assert up._lanes == [lane]
            # four at once: four streams, all kept
            answers = await asyncio.gather(*(_answer(up) for _ in range(4)))
            assert answers == [first] * 4 and len(up._lanes) == 4
            # a request abandoned after its first piece: its stream is cancelled, not reused
            lanes_before = list(up._lanes)
            s = up.stream(PROMPT, GenerationParams(max_tokens=200, min_tokens=200))
            await s.__anext__()
            taken = [c for c in lanes_before if c not in up._lanes]
            assert len(taken) == 1
            await s.aclose()
            assert taken[0].cancelled() and taken[0] not in up._lanes and len(up._lanes) == 3
            assert await _answer(up) == first  # the server still answers whole
        finally:
            await up.close()

    asyncio.run(run())


def test_a_request_past_its_timeout_fails_alone(stories_server):
    async def run():
        up = Upstream(stories_server.grpc_url, "ensemble", None, timeout_s=0.001)
        try:
            with pytest.raises(RequestTimeout, match="no answer within"):
                await _answer(up, 200)
            assert up._lanes == []  # the timed-out request's stream was cancelled
            up.timeout_s = 60.0
            assert (await _answer(up))[1] == 12
        finally:
            await up.close()

    asyncio.run(run())

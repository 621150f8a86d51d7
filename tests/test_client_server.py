"""tritonchat.client and `tritonchat chat` against the real tritonserver (stories260K)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_generate_stream_and_cancel(stories_server, protocol):
    from tritonchat.client import AsyncChatClient, InvalidRequest

    url = stories_server.grpc_url if protocol == "grpc" else stories_server.http_url

    async def main():
        async with AsyncChatClient(url, protocol=protocol) as c:
            await c.wait_ready(timeout=30)
            whole = await c.generate("Once upon a time", max_tokens=30)
            pieces = [d.text async for d in c.stream("Once upon a time", max_tokens=30)]
            assert "".join(pieces) == whole.text
            # leave a long stream early; the server must still answer the next ones
            async with c.stream("Once upon a time", max_tokens=400, min_tokens=400) as s:
                async for i, _ in _aenumerate(s):
                    if i == 2:
                        break
            with pytest.raises(InvalidRequest, match="top_p"):
                await c.generate("Hi", max_tokens=4, top_p=2.0)
            many = await asyncio.gather(*[c.generate("Once upon a time", max_tokens=12) for _ in range(8)])
            assert {m.text for m in many} == {(await c.generate("Once upon a time", max_tokens=12)).text}

    asyncio.run(main())


async def _aenumerate(ait):
    i = 0
    async for x in ait:
        yield i, x
        i += 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_chat_command_prints_the_streamed_answer(stories_server, protocol):
    url = stories_server.grpc_url if protocol == "grpc" else stories_server.http_url
    cmd = [sys.executable, "-m", "tritonchat.cli", "chat", "Once upon a time", "--url", url,
           "--protocol", protocol, "--max-tokens", "40"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(", there was a little girl named Lily.")
    assert "finish=length" in run.stderr
    bad = subprocess.run(cmd[:-1] + ["0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_tokens must be > 0" in bad.stderr


def test_model_not_found(stories_server):
    from tritonchat.client import ChatClient, ModelNotFound

    for protocol, url in (("grpc", stories_server.grpc_url), ("http", stories_server.http_url)):
        with ChatClient(url, protocol=protocol, model="nope") as c, pytest.raises(ModelNotFound):
            c.generate("Hi", max_tokens=4)

"""The benchmark's client for an OpenAI-compatible endpoint (the gateway): ``protocol="openai"`` in
``tritonchat bench``. It has the API the sweep uses of :class:`tritonchat.client.AsyncChatClient`
(``stream``, ``generate``, ``wait_ready``, ``close``, ``async with``), speaking ``POST /v1/completions``
(the same plain prompt the direct client sends: no chat template on either side).

The OpenAI API returns no token ids. Each chunk's token count comes from the usage the gateway sends in
every chunk (``stream_options.continuous_usage_stats``, vLLM's extension), and :class:`Delta.output_ids`
holds one ``-1`` per token: the sweep counts tokens by ``len(output_ids)``, so its per-token timing
(TTFT, ITL) applies unchanged. ``Cache-Control: no-store``: every request is generated, never cached.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Dict, Optional

from tritonchat.client import AsyncDeltaStream, Completion, Delta, GenerationParams
from tritonchat.client.results import merge_deltas
from tritonchat.client.errors import ServerUnavailable, error_from_http
from tritonchat.client.sse import SSEParser

__all__ = ["OpenAIBenchClient", "make_client"]

_EXTENSIONS = ("top_k", "min_tokens", "repetition_penalty")


def make_client(url: str, protocol: str, model: str, timeout: Optional[float]):
    """The sweep's client for `protocol`: grpc | http (Triton, tritonchat.client) or openai (this module)."""
    if protocol == "openai":
        return OpenAIBenchClient(url, model=model, timeout=timeout)
    from tritonchat.client import AsyncChatClient

    return AsyncChatClient(url, protocol=protocol, model=model, timeout=timeout)


class OpenAIBenchClient:
    def __init__(self, url: str, model: str = "ensemble", timeout: Optional[float] = 600.0):
        self.base = (url if "://" in url else f"http://{url}").rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.url = url
        self.protocol = "openai"
        self.model = model
        self.timeout = timeout
        self._session = None

    async def _http(self):
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=self.timeout),
                connector=aiohttp.TCPConnector(limit=0))  # no pool limit: one connection per stream
        return self._session

    def _body(self, prompt: str, params: GenerationParams, stream: bool) -> Dict[str, Any]:
        f = params.set_fields()
        body: Dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": f["max_tokens"],
                                "stream": stream}
        for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", *_EXTENSIONS):
            if name in f:
                body[name] = f[name]
        if "stop" in f:
            body["stop"] = f["stop"]
        if f.get("min_tokens") is not None and f["min_tokens"] >= f["max_tokens"]:
            body["ignore_eos"] = True  # the same ask in the words llama.cpp's server (and vLLM) know
        if stream:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return body

    async def _post(self, session, body: Dict[str, Any]):
        """POST a streamed request; again (up to 4 tries) when a kept-alive connection turned out to be
        closed by the server before it took the request: llama.cpp's server closes a connection after a
        few requests (cpp-httplib's keep-alive count), and aiohttp then fails the write or sees the
        disconnect before any response byte. The failed connection leaves the pool each time."""
        import aiohttp

        headers = {"Cache-Control": "no-store", "Accept": "text/event-stream"}
        for attempt in range(4):
            try:
                return await session.post(self.base + "/v1/completions", json=body, headers=headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if attempt == 3:
                    raise

    def stream(self, prompt: str, params: GenerationParams) -> AsyncDeltaStream:
        return AsyncDeltaStream(self._deltas(prompt, params))

    async def _deltas(self, prompt: str, params: GenerationParams) -> AsyncIterator[Delta]:
        session = await self._http()
        resp = await self._post(session, self._body(prompt, params, True))
        done = False
        try:
            if resp.status != 200:
                raise error_from_http(resp.status, _message(await resp.read()))
            parser, seen = SSEParser(), 0
            while True:
                chunk = await resp.content.readany()
                events = parser.feed(chunk) if chunk else parser.close()
                for data in events:
                    if data == "[DONE]":
                        done = True
                        return
                    obj = json.loads(data)
                    if "error" in obj:
                        raise error_from_http(500, str(obj["error"].get("message")))
                    usage = obj.get("usage") or {}
                    choices = obj.get("choices")
                    # a server without per-chunk usage (llama.cpp's) streams a token per event
                    n = usage.get("completion_tokens", seen + (1 if choices and choices[0].get("text") else 0))
                    if not choices:  # the closing usage chunk: the tokens no event counted yet
                        if n > seen:
                            yield Delta(text="", output_ids=[-1] * (n - seen), num_output_tokens=n,
                                        num_input_tokens=usage.get("prompt_tokens"))
                            seen = n
                        continue
                    choice = choices[0]
                    yield Delta(text=choice.get("text", ""), output_ids=[-1] * max(0, n - seen),
                                finish_reason=choice.get("finish_reason"), num_output_tokens=n,
                                num_input_tokens=usage.get("prompt_tokens"))
                    seen = n
                if not chunk:
                    return
        finally:
            if done:
                resp.release()
            else:
                resp.close()  # drop the connection: the gateway cancels the request

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        session = await self._http()
        async with session.post(self.base + "/v1/completions", json=self._body(prompt, params, False),
                                headers={"Cache-Control": "no-store"}) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise error_from_http(resp.status, _message(raw))
        obj = json.loads(raw)
        choice, usage = obj["choices"][0], obj.get("usage") or {}
        n = usage.get("completion_tokens")
        return merge_deltas([Delta(choice.get("text", ""), [-1] * (n or 0), choice.get("finish_reason"), n,
                                   usage.get("prompt_tokens"))])

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        session = await self._http()
        deadline = time.monotonic() + timeout
        while True:
            for path in ("/health/ready", "/health"):  # the gateway's, then llama.cpp's server's
                try:
                    async with session.get(self.base + path) as resp:
                        if resp.status == 200:
                            return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            if time.monotonic() >= deadline:
                raise ServerUnavailable(f"the gateway at {self.base} is not ready after {timeout:g} s")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> "OpenAIBenchClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", errors="replace")[:300]

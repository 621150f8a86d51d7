"""The asyncio chat client (:class:`AsyncChatClient`) and its stream of deltas (:class:`AsyncDeltaStream`);
see :mod:`.api` for what both clients share."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, List, Optional
from urllib.parse import quote

from .api import ClientSettings, Health, generate_body_deltas, http_error_message, not_ready_error, resolve_params
from .errors import CORE_INTERNAL_ATTEMPTS, CORE_INTERNAL_PAUSE_S, GRPC_CORE_INTERNAL, TritonChatError, \
    error_from_exception, error_from_http
from .params import GenerationParams, Prompt, build_grpc_inputs, build_json_body
from .results import Completion, Delta, delta_from_infer_result, delta_from_json, has_outputs, \
    is_final_response, merge_deltas
from .sse import SSEParser, decode_event

__all__ = ["AsyncChatClient", "AsyncDeltaStream"]


class AsyncDeltaStream:
    """Async iterator of :class:`Delta`.  Use ``async with client.stream(...) as s: async for d in s``
    (or call ``aclose()``) so that leaving early cancels the request at once; ``cancel()`` is an
    alias of ``aclose()``.  ``completion`` merges what was received."""

    def __init__(self, agen: AsyncIterator[Delta]):
        self._agen = agen
        self._deltas: List[Delta] = []

    def __aiter__(self) -> "AsyncDeltaStream":
        return self

    async def __anext__(self) -> Delta:
        d = await self._agen.__anext__()
        self._deltas.append(d)
        return d

    async def aclose(self) -> None:
        await self._agen.aclose()

    cancel = aclose

    @property
    def completion(self) -> Completion:
        return merge_deltas(self._deltas)

    async def __aenter__(self) -> "AsyncDeltaStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncChatClient(ClientSettings):
    """asyncio client with the same API as :class:`ChatClient` (``await`` its methods; ``stream``
    returns an :class:`AsyncDeltaStream`).  Create it anywhere; connections are opened inside the
    running loop on first use.  Close with ``await client.close()`` or ``async with``."""

    def __init__(self, url: Optional[str] = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout: Optional[float] = 600.0, connect_timeout: float = 5.0, verbose: bool = False,
                 api_key: Optional[str] = None):
        ClientSettings.__init__(self, url, protocol, model, timeout, connect_timeout, verbose, api_key)
        self._grpc = None
        self._session = None

    def __repr__(self) -> str:
        return f"AsyncChatClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

    async def generate(self, prompt: Prompt, params: Optional[GenerationParams] = None,
                       **overrides: Any) -> Completion:
        p = resolve_params(params, overrides)
        if self.protocol == "grpc":
            agen = self._grpc_deltas(prompt, p, False)
            try:
                return merge_deltas([d async for d in agen])
            finally:
                await agen.aclose()
        return merge_deltas(await self._http_generate(prompt, p))

    def stream(self, prompt: Prompt, params: Optional[GenerationParams] = None,
               **overrides: Any) -> AsyncDeltaStream:
        p = resolve_params(params, overrides)
        if self.protocol == "grpc":
            return AsyncDeltaStream(self._grpc_deltas(prompt, p, True))
        return AsyncDeltaStream(self._http_stream_deltas(prompt, p))

    async def health(self) -> Health:
        t, h = self.connect_timeout, self.headers
        if self.protocol == "grpc":
            client = await self._grpc_client()
            return Health(await _asafe(client.is_server_live(headers=h, client_timeout=t)),
                          await _asafe(client.is_server_ready(headers=h, client_timeout=t)),
                          await _asafe(client.is_model_ready(self.model, headers=h, client_timeout=t)))
        import tritonclient.http.aio as aiohttpclient

        client = aiohttpclient.InferenceServerClient(self.url, conn_timeout=t)
        try:
            return Health(await _asafe(client.is_server_live(headers=h)),
                          await _asafe(client.is_server_ready(headers=h)),
                          await _asafe(client.is_model_ready(self.model, headers=h)))
        finally:
            await _asafe(client.close())

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> Health:
        deadline = time.monotonic() + timeout
        while True:
            h = await self.health()
            if h:
                return h
            if time.monotonic() >= deadline:
                raise not_ready_error(self.url, self.model, timeout, h)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        grpc_client, self._grpc = self._grpc, None
        session, self._session = self._session, None
        if grpc_client is not None:
            await _asafe(grpc_client.close())
        if session is not None:
            await _asafe(session.close())

    async def __aenter__(self) -> "AsyncChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- gRPC ---------------------------------------------------------------------------------

    async def _grpc_client(self):
        if self._grpc is None:
            import tritonclient.grpc.aio as aiogrpc

            self._grpc = aiogrpc.InferenceServerClient(url=self.url, verbose=self.verbose)
        return self._grpc

    async def _grpc_deltas(self, prompt: Prompt, params: GenerationParams, stream: bool) -> AsyncIterator[Delta]:
        inputs = build_grpc_inputs(prompt, params, stream)
        client = await self._grpc_client()

        async def requests():
            # One request, then the client half-closes; Triton ends the stream after the request's
            # last response, which is how the end is seen (the aio client cannot ask for the
            # empty final-response flag: "triton_" parameters are reserved there).
            yield {"model_name": self.model, "inputs": inputs}

        for attempt in range(1, CORE_INTERNAL_ATTEMPTS + 1):
            call = None
            finished = answered = False
            if attempt > 1:
                await asyncio.sleep(CORE_INTERNAL_PAUSE_S * attempt)
            try:
                try:
                    call = client.stream_infer(requests(), stream_timeout=self.timeout, headers=self.headers or None)
                except Exception as exc:
                    raise error_from_exception(exc) from None
                while True:
                    try:
                        result, error = await call.__anext__()
                    except StopAsyncIteration:
                        finished = True
                        return
                    except Exception as exc:  # grpc.aio.AioRpcError, InferenceServerException, ...
                        if attempt < CORE_INTERNAL_ATTEMPTS and not answered and GRPC_CORE_INTERNAL in str(exc):
                            break  # grpc's error for a stream Triton ended at once: once more (errors.py)
                        raise error_from_exception(exc) from None
                    answered = True
                    if error is not None:
                        raise error_from_exception(error)
                    if has_outputs(result):
                        yield delta_from_infer_result(result)
                    if is_final_response(result):
                        finished = True
                        return
            finally:
                if call is not None and not finished:
                    try:
                        call.cancel()
                    except Exception:
                        pass

    # ---- HTTP ---------------------------------------------------------------------------------

    async def _http_session(self):
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_read=self.timeout))
        return self._session

    def _endpoint(self, stream: bool) -> str:
        return f"http://{self.url}/v2/models/{quote(self.model, safe='')}/generate" + ("_stream" if stream else "")

    async def _http_generate(self, prompt: Prompt, params: GenerationParams) -> List[Delta]:
        session = await self._http_session()
        body = json.dumps(build_json_body(prompt, params, False)).encode("utf-8")
        try:
            async with session.post(self._endpoint(False), data=body,
                                    headers={"Content-Type": "application/json", **self.headers}) as resp:
                raw = await resp.read()
                status = resp.status
        except TritonChatError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise error_from_exception(exc) from None
        return generate_body_deltas(raw, status)

    async def _http_stream_deltas(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[Delta]:
        session = await self._http_session()
        body = json.dumps(build_json_body(prompt, params, True)).encode("utf-8")
        resp = None
        finished = False
        try:
            try:
                resp = await session.post(self._endpoint(True), data=body,
                                          headers={"Content-Type": "application/json",
                                                   "Accept": "text/event-stream", **self.headers})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise error_from_exception(exc) from None
            if resp.status != 200:
                raise error_from_http(resp.status, http_error_message(await resp.read()))
            parser = SSEParser()
            while True:
                try:
                    chunk = await resp.content.readany()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise error_from_exception(exc) from None
                if not chunk:
                    break
                for data in parser.feed(chunk):
                    yield delta_from_json(decode_event(data))
            for data in parser.close():
                yield delta_from_json(decode_event(data))
            finished = True
        finally:
            if resp is not None:
                if finished:
                    resp.release()
                else:
                    resp.close()  # drop the connection: Triton cancels the request


async def _asafe(awaitable) -> bool:
    try:
        return bool(await awaitable)
    except Exception:
        return False

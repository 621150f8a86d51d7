"""The gateway's side of Triton (gRPC, tritonclient's asyncio client): the entry model's answers over
``ModelStreamInfer`` streams (cancelled when the client goes away), readiness, the versions fingerprint
for the cache, the context length, and Triton's metrics text for relaying.

A stream carries one request at a time and is kept for the next request once the answer's final
response has come (a "lane"): opening and closing a gRPC call per request was about a third of the
gateway's gRPC CPU at 16 streams. Cancelling a request cancels its whole call, which Triton turns into
cancelling that request, the only one on it; the call is then dropped, as is any call that failed.

A Triton locked by ``tritonchat serve --api-key-file/--admin-key-file`` (tritonchat/security.py) gets the
keys as gRPC metadata: the API key on every call, the admin key on the repository index.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Dict, List, Optional

import struct

from tritonchat.client import AsyncDeltaStream, Completion, Delta, GenerationParams, build_arrays, normalize_url
from tritonchat.client.errors import CORE_INTERNAL_ATTEMPTS, CORE_INTERNAL_PAUSE_S, GRPC_CORE_INTERNAL, \
    RequestTimeout, ServerUnavailable, error_from_exception, error_from_status
from tritonchat.client.results import delta_from_infer_result, merge_deltas
from tritonchat.security import key_headers

__all__ = ["Upstream", "FALLBACK_MAX_TOKENS"]

FALLBACK_MAX_TOKENS = 256  # default max_tokens when Triton's configs name no context length
MAX_IDLE_LANES = 256  # idle streams kept for reuse (one per concurrent request at the peak, up to this)
_CONTEXT_TTL_S = 10.0
# the models of a tritonchat repository, for the fingerprint when the repository index is closed to us
_PIPELINE = ("preprocessing", "generator", "postprocessing")
# what the gateway reads of each response (not output_ids: the OpenAI API has no use for them)
OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens", "finish_reason")


def _EOF():
    import grpc

    return grpc.aio.EOF


def read_response(response) -> Delta:
    """A Delta straight from a ``ModelInferResponse`` protobuf: the raw little-endian bytes of the four
    outputs, without building an InferResult and numpy arrays for each (this runs once per streamed
    piece; docs/contract.md: BYTES elements are a 4-byte length and the bytes)."""
    d = Delta()
    for out, raw in zip(response.outputs, response.raw_output_contents):
        name = out.name
        if name == "text_output":
            parts, i = [], 0
            while i + 4 <= len(raw):
                (n,) = struct.unpack_from("<I", raw, i)
                parts.append(raw[i + 4:i + 4 + n])
                i += 4 + n
            d.text = b"".join(parts).decode("utf-8", errors="replace")
        elif name == "finish_reason":
            reason = raw[4:].decode("utf-8", errors="replace").strip() if len(raw) >= 4 else ""
            d.finish_reason = reason or None
        elif name in ("num_input_tokens", "num_output_tokens") and len(raw) >= 4:
            setattr(d, name, struct.unpack_from("<i", raw)[0])
    if not response.raw_output_contents and response.outputs:  # the JSON-style typed contents instead
        return delta_from_infer_result(_Result(response))
    return d


class _Result:
    """Just enough of tritonclient's InferResult for :func:`delta_from_infer_result`."""

    def __init__(self, response):
        from tritonclient.grpc import InferResult

        self._r = InferResult(response)

    def as_numpy(self, name):
        return self._r.as_numpy(name)


class Upstream:
    def __init__(self, triton_url: str, model: str, metrics_url: Optional[str], timeout_s: float,
                 api_key: Optional[str] = None, admin_key: Optional[str] = None):
        self.url = normalize_url(triton_url, "grpc")
        self.model = model
        self.metrics_url = metrics_url
        self.timeout_s = timeout_s
        self._headers = key_headers("grpc", api_key=api_key) or None
        self._admin_headers = key_headers("grpc", api_key=api_key, admin_key=admin_key) or None
        self._index_open = True
        self._client = None
        self._stub = None
        self._lanes: List = []  # idle ModelStreamInfer calls, newest last
        self._channel = None
        self._session = None
        self._context: Optional[int] = None
        self._context_at = 0.0

    async def _grpc(self):
        if self._client is None:
            import tritonclient.grpc.aio as aiogrpc

            self._client = aiogrpc.InferenceServerClient(self.url)
        return self._client

    # ---- generation -----------------------------------------------------------------------------

    def stream(self, prompt, params: GenerationParams) -> AsyncDeltaStream:
        """The answer's deltas; ``aclose()`` before the end cancels the gRPC call (Triton cancels the request)."""
        return AsyncDeltaStream(self._deltas(prompt, params, True))

    async def generate(self, prompt, params: GenerationParams) -> Completion:
        agen = self._deltas(prompt, params, False)
        try:
            return merge_deltas([d async for d in agen])
        finally:
            await agen.aclose()

    def _stream_stub(self):
        """Triton's ModelStreamInfer on a channel of our own: the generated stub, written to directly
        (no request-iterator task, no InferInput/InferResult objects: about a third less CPU per request
        than tritonclient's asyncio wrapper, measured at 16 streams)."""
        if self._stub is None:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            unlimited = 2 ** 31 - 1  # prompts and answers of any length, as tritonclient allows
            self._channel = grpc.aio.insecure_channel(self.url, options=[
                ("grpc.max_send_message_length", unlimited), ("grpc.max_receive_message_length", unlimited)])
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def _request(self, prompt, params: GenerationParams, stream: bool):
        from tritonclient.grpc import service_pb2
        from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

        req = service_pb2.ModelInferRequest(model_name=self.model)
        for name, arr in build_arrays(prompt, params, stream).items():
            req.inputs.add(name=name, datatype=np_to_triton_dtype(arr.dtype), shape=arr.shape)
            raw = serialize_byte_tensor(arr).item() if arr.dtype == object else arr.tobytes()
            req.raw_input_contents.append(raw)
        for name in OUTPUTS:
            req.outputs.add(name=name)
        return req

    def _lane(self):
        """An idle stream, or a new one. No deadline on the call (it outlives requests): each request's
        timeout is a timer that cancels it."""
        while self._lanes:
            call = self._lanes.pop()
            if not call.done():  # a call ended by the server (a restart) is not reused
                return call
        metadata = tuple(self._headers.items()) if self._headers else None
        return self._stream_stub().ModelStreamInfer(metadata=metadata)

    async def _deltas(self, prompt, params: GenerationParams, stream: bool) -> AsyncIterator[Delta]:
        import asyncio

        request = self._request(prompt, params, stream)
        # a response with the final flag always ends the request, so the stream can carry the next one
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        call = timer = None
        reusable = timed_out = False

        def expire():
            nonlocal timed_out
            timed_out = True
            call.cancel()

        def failed(exc: BaseException) -> BaseException:
            # the timer's cancel surfaces as asyncio.CancelledError from the write or the read
            if timed_out:
                return RequestTimeout(f"no answer within {self.timeout_s:g} s")
            return error_from_exception(exc) if isinstance(exc, Exception) else exc

        try:
            for attempt in range(1, CORE_INTERNAL_ATTEMPTS + 1):
                try:
                    call = self._lane()
                    await call.write(request)
                    # armed after the write: a call cancelled while grpc.aio writes to it can leave the
                    # write waiting for ever (seen with grpcio 1.85); one request's write does not wait on
                    # Triton
                    if timer is None:
                        timer = asyncio.get_running_loop().call_later(self.timeout_s, expire)
                    message = await call.read()
                    break
                except BaseException as exc:  # noqa: BLE001 - grpc.aio.AioRpcError and the like
                    # a stream Triton ends at once (refusing the gateway's credentials) can fail the
                    # write or the first read with grpc's own error, hiding Triton's status
                    # (client/errors.py): nothing was answered, so the request goes once more on a new
                    # stream, after a short pause
                    if attempt < CORE_INTERNAL_ATTEMPTS and GRPC_CORE_INTERNAL in str(exc) and not timed_out:
                        call.cancel()
                        await asyncio.sleep(CORE_INTERNAL_PAUSE_S * attempt)
                        if not timed_out:
                            continue
                    raise failed(exc) from None
            while True:
                if message is _EOF():
                    raise ServerUnavailable("the inference server closed the stream before the answer ended")
                if message.error_message:  # Triton 2.51 sends no code inside a stream: the text decides
                    raise error_from_status(None, message.error_message)
                response = message.infer_response
                if response.outputs:
                    yield read_response(response)
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    reusable = True
                    return
                try:
                    message = await call.read()
                except BaseException as exc:  # noqa: BLE001
                    raise failed(exc) from None
        finally:
            if timer is not None:
                timer.cancel()
            if call is not None:
                if reusable and len(self._lanes) < MAX_IDLE_LANES:
                    self._lanes.append(call)
                else:
                    call.cancel()  # synchronous: runs even inside a cancelled task

    # ---- state of the server --------------------------------------------------------------------

    async def ready(self) -> bool:
        try:
            c = await self._grpc()
            return bool(await c.is_server_ready(client_timeout=2.0)) and bool(
                await c.is_model_ready(self.model, client_timeout=2.0))
        except Exception:  # noqa: BLE001 - not reachable is not ready
            return False

    async def fingerprint(self) -> str:
        """``name:version,...``: the newest ready version of every model Triton serves (one
        repository-index RPC). The entry model calls its steps at their newest version, so a new
        version loaded beside an old one changes the fingerprint. Where the index is closed (a
        locked Triton without the admin key), the entry's and the pipeline's model metadata."""
        c = await self._grpc()
        if self._index_open:
            try:
                index = await c.get_model_repository_index(as_json=True, headers=self._admin_headers,
                                                           client_timeout=5.0)
                return self._from_index(index)
            except ServerUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001
                err = error_from_exception(exc)
                if "restricted" not in err.message:
                    raise err from None
                self._index_open = False
        parts: List[str] = []
        for name in (self.model, *_PIPELINE):
            try:
                meta = await c.get_model_metadata(name, as_json=True, headers=self._headers, client_timeout=5.0)
            except Exception as exc:  # noqa: BLE001
                if name == self.model:
                    raise error_from_exception(exc) from None
                continue  # not a model of this repository
            versions = [int(v) for v in meta.get("versions", []) if str(v).isdigit()]
            parts.append(f"{name}:{max(versions) if versions else 0}")
        return ",".join(sorted(parts))

    def _from_index(self, index: Dict) -> str:
        newest: Dict[str, int] = {}
        for m in index.get("models", []):
            if m.get("state") != "READY" or not str(m.get("version", "")).isdigit():
                continue
            v = int(m["version"])
            newest[m["name"]] = max(v, newest.get(m["name"], v))
        if self.model not in newest:
            raise ServerUnavailable(f"model {self.model!r} is not ready on the inference server")
        return ",".join(f"{n}:{v}" for n, v in sorted(newest.items()))

    async def context_length(self) -> Optional[int]:
        """``max_seq_len`` from the entry model's or the generator's config parameters (re-read every 10 s)."""
        now = time.monotonic()
        if self._context is not None and now - self._context_at < _CONTEXT_TTL_S:
            return self._context
        found = None
        try:
            c = await self._grpc()
            for name in (self.model, "generator"):
                try:
                    cfg = await c.get_model_config(name, as_json=True, headers=self._headers, client_timeout=5.0)
                except Exception:  # noqa: BLE001 - not every repository has a model of that name
                    continue
                value = (cfg.get("config", {}).get("parameters", {}).get("max_seq_len") or {}).get("string_value")
                if value and value.isdigit():
                    found = int(value)
                    break
        except Exception:  # noqa: BLE001
            found = None
        if found is not None:
            self._context, self._context_at = found, now
        return found or self._context

    async def metrics_text(self) -> Optional[str]:
        if not self.metrics_url:
            return None
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3.0))
        url = self.metrics_url if "://" in self.metrics_url else f"http://{self.metrics_url}"
        if not url.rstrip("/").endswith("/metrics"):
            url = url.rstrip("/") + "/metrics"
        try:
            async with self._session.get(url) as r:
                return await r.text() if r.status == 200 else None
        except Exception:  # noqa: BLE001 - relaying is best effort; the gateway's own metrics still answer
            return None

    async def close(self) -> None:
        lanes, self._lanes = self._lanes, []
        for call in lanes:
            call.cancel()
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001
                pass
        session, self._session = self._session, None
        if session is not None:
            await session.close()

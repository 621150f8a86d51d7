"""One generation request, from a validated body to the HTTP answer: cache look-up, the Triton
stream, SSE or one JSON object, cache write, metrics, and cancellation when the client goes away.

Streamed requests wait for Triton's first response before sending headers, so that what Triton
refuses (a prompt longer than the context, a full queue) is a proper 400 / 503, not an error event
inside a 200 stream. From then on, a client that disconnects cancels the stream's task (gateway/sse.py
listens for ``http.disconnect``), which cancels the gRPC call; a non-streamed request races its
Triton call against the disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tritonchat.client.errors import TritonChatError

from .cache import CacheError, CachedAnswer, ResponseCache, cache_key
from .errors import APIError, from_triton
from .limits import Lease
from .metrics import GatewayMetrics
from .responses import DONE, Shaper
from .schemas import Prepared
from .sse import Last, SSEResponse
from .upstream import Upstream

__all__ = ["Generation", "ClientGone"]

log = logging.getLogger("tritonchat.gateway")
_COMPLETE = ("stop", "length")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class _Ending:
    """What ends a streamed answer, run once, whichever comes first: the body generator's own end, or
    the response's end (SSEResponse), which also covers a body that never started (an unstarted
    generator runs no finally)."""

    def __init__(self, gen: "Generation", lease: Lease, stream=None):
        self.gen, self.lease, self.stream = gen, lease, stream
        self.complete = self.failed = self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        # the bookkeeping first and without awaiting, so that a second cancellation cannot skip it;
        # closing the stream cancels the gRPC call synchronously in its first step
        self.gen.metrics.in_flight.dec()
        self.lease.release()
        if not (self.complete or self.failed):
            self.gen.metrics.disconnects.inc()
        if self.stream is not None:
            await _close(self.stream)  # cancels the gRPC call if Triton has not finished


@dataclass
class Generation:
    upstream: Upstream
    cache: ResponseCache
    metrics: GatewayMetrics

    async def answer(self, request: Request, prep: Prepared, lease: Lease, endpoint: str) -> Response:
        """The response for `prep`; `lease` is released when the answer (stream included) is over."""
        t0 = time.perf_counter()
        handed_over = False
        self.metrics.in_flight.inc()
        try:
            key = fingerprint = None
            cache_mode = _cache_mode(request)
            if self.cache.kind != "off" and prep.deterministic and cache_mode != "bypass":
                fingerprint = await self._fingerprint()
                key = cache_key(self.upstream.model, fingerprint, prep.kind, prep.canonical_input(),
                                prep.params.set_fields())
                if cache_mode == "use":
                    hit = await self._lookup(key)
                    if hit is not None:
                        resp = self._from_cache(prep, hit, fingerprint, endpoint, t0, lease)
                        handed_over = prep.stream
                        return resp
            shaper = Shaper(prep.kind, prep.model, fingerprint, prep.include_usage, prep.continuous_usage)
            headers = {"X-Cache": "miss" if fingerprint else "bypass"}
            if prep.stream:
                stream = self.upstream.stream(prep.prompt, prep.params)
                try:
                    # not raced against a disconnect (two tasks per request, on the TTFT path): a client
                    # gone before its first token is seen by the stream's own listener right after
                    first = await stream.__anext__()
                except BaseException:
                    await _close(stream)
                    raise
                handed_over = True
                ending = _Ending(self, lease, stream)
                body = self._stream_body(stream, first, shaper, prep, key, fingerprint, endpoint, t0, ending)
                return SSEResponse(body, ending, headers)
            completion = await _until_disconnect(request, self.upstream.generate(prep.prompt, prep.params))
            self._count(endpoint, 200, completion.num_input_tokens, completion.num_output_tokens, t0)
            if key and completion.finish_reason in _COMPLETE:
                await self._store(key, fingerprint, CachedAnswer([completion.text], completion.finish_reason,
                                                                 completion.num_input_tokens,
                                                                 completion.num_output_tokens))
            return JSONResponse(shaper.whole(completion.text, completion.finish_reason, completion.num_input_tokens,
                                             completion.num_output_tokens), headers=headers)
        except StopAsyncIteration:
            raise APIError(502, "the inference server ended the stream without an answer", "server_error")
        except TritonChatError as exc:
            raise from_triton(exc) from None
        except ClientGone:
            self.metrics.disconnects.inc()
            return Response(status_code=499)
        finally:
            if not handed_over:
                self.metrics.in_flight.dec()
                lease.release()

    # ---- cache ----------------------------------------------------------------------------------

    async def _fingerprint(self) -> str:
        try:
            return await self.upstream.fingerprint()
        except TritonChatError as exc:
            raise from_triton(exc) from None

    async def _lookup(self, key: str) -> Optional[CachedAnswer]:
        try:
            raw = await self.cache.get(key)
        except CacheError as exc:
            self.metrics.cache_errors.inc()
            log.warning("%s", exc)
            raw = None
        if raw is None:
            self.metrics.cache_misses.inc()
            return None
        self.metrics.cache_hits.inc()
        self.metrics.cache_hit_bytes.inc(len(raw))
        return CachedAnswer.from_bytes(raw)

    async def _store(self, key: str, fingerprint: Optional[str], answer: CachedAnswer) -> None:
        # a version loaded while this answer was generated may have produced it: store it only if
        # the fingerprint is still the one the key was made with
        try:
            if await self.upstream.fingerprint() != fingerprint:
                return
            raw = answer.to_bytes()
            await self.cache.put(key, raw)
        except CacheError as exc:
            self.metrics.cache_errors.inc()
            log.warning("%s", exc)
            return
        except TritonChatError:
            return
        self.metrics.cache_stored_bytes.inc(len(raw))
        n = self.cache.entries()
        if n is not None:
            self.metrics.cache_entries.set(n)

    def _from_cache(self, prep: Prepared, hit: CachedAnswer, fingerprint: str, endpoint: str, t0: float,
                    lease: Lease) -> Response:
        shaper = Shaper(prep.kind, prep.model, fingerprint, prep.include_usage, prep.continuous_usage)
        headers = {"X-Cache": "hit"}
        if not prep.stream:
            self._count(endpoint, 200, hit.prompt_tokens, hit.completion_tokens, t0)
            return JSONResponse(shaper.whole(hit.text, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens),
                                headers=headers)

        ending = _Ending(self, lease)

        async def body() -> AsyncIterator[bytes]:
            try:
                last = len(hit.pieces) - 1
                for i, piece in enumerate(hit.pieces):
                    if i == 0:
                        self.metrics.ttft.observe(time.perf_counter() - t0)
                    yield shaper.chunk(piece, hit.finish_reason if i == last else None, hit.prompt_tokens,
                                       hit.completion_tokens if i == last else None)
                if not hit.pieces:
                    yield shaper.chunk("", hit.finish_reason, hit.prompt_tokens, hit.completion_tokens)
                if prep.include_usage:
                    yield shaper.usage_chunk(hit.prompt_tokens, hit.completion_tokens)
                yield DONE
                ending.complete = True
                self._count(endpoint, 200, hit.prompt_tokens, hit.completion_tokens, t0)
            finally:
                await ending()

        return SSEResponse(body(), ending, headers)

    # ---- streaming ------------------------------------------------------------------------------

    async def _stream_body(self, stream, first, shaper: Shaper, prep: Prepared, key: Optional[str],
                           fingerprint: Optional[str], endpoint: str, t0: float,
                           ending: _Ending) -> AsyncIterator[bytes]:
        pieces = []
        finish = n_in = n_out = None
        tail = b""  # the chunk with the finish reason, held to go out with the usage chunk and [DONE]
        try:
            delta: Any = first
            ttft_seen = False
            while True:
                if delta.num_input_tokens is not None:
                    n_in = delta.num_input_tokens
                if delta.num_output_tokens is not None:
                    n_out = delta.num_output_tokens
                if delta.finish_reason:
                    finish = delta.finish_reason
                if delta.text or delta.finish_reason:
                    if delta.text and not ttft_seen:
                        ttft_seen = True
                        self.metrics.ttft.observe(time.perf_counter() - t0)
                    pieces.append(delta.text)
                    chunk = shaper.chunk(delta.text, delta.finish_reason or None, n_in, n_out)
                    if delta.finish_reason:
                        tail += chunk  # Triton's last response: the stream ends right after it
                    else:
                        yield chunk
                try:
                    delta = await stream.__anext__()
                except StopAsyncIteration:
                    break
            if prep.include_usage:
                tail += shaper.usage_chunk(n_in, n_out)
            ending.complete = True
            # one write for the end of the answer (and of the HTTP body) instead of three or four
            yield Last(tail + DONE)
        except TritonChatError as exc:  # after the headers: an error event, as OpenAI sends one
            ending.failed = True
            err = from_triton(exc)
            self._count(endpoint, err.status, None, None, t0)
            yield Shaper.error_event(err.body())
        finally:
            await ending()
        if ending.complete:
            self._count(endpoint, 200, n_in, n_out, t0)
            if key and finish in _COMPLETE:
                await self._store(key, fingerprint, CachedAnswer([p for p in pieces if p], finish, n_in, n_out))

    def _count(self, endpoint: str, status: int, n_in: Optional[int], n_out: Optional[int], t0: float) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        if n_in:
            self.metrics.prompt_tokens.inc(n_in)
        if n_out:
            self.metrics.completion_tokens.inc(n_out)


def _cache_mode(request: Request) -> str:
    """``Cache-Control: no-cache`` -> answer fresh (and store); ``no-store`` -> neither read nor store."""
    cc = request.headers.get("cache-control", "").lower()
    if "no-store" in cc:
        return "bypass"
    if "no-cache" in cc:
        return "refresh"
    return "use"


async def _close(stream) -> None:
    try:
        await stream.aclose()
    except Exception:  # noqa: BLE001 - closing a finished or failed stream
        pass


async def _until_disconnect(request: Request, awaitable) -> Any:
    """Await `awaitable` unless the client disconnects first (then it is cancelled: ClientGone)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    try:
        await work
    except BaseException:  # noqa: BLE001 - the cancelled call's own end
        pass
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

"""Chat clients for the ``ensemble`` (docs/contract.md), over gRPC or HTTP, sync and asyncio.

gRPC: every request, streamed or not, goes through the bidirectional ``ModelStreamInfer`` stream
(the generator step is decoupled; Triton refuses unary inference for decoupled models).  The
non-streaming call sends ``stream=False`` and collects the single answer.
HTTP: Triton's generate extension, ``POST /v2/models/{model}/generate`` (one JSON answer) and
``.../generate_stream`` (Server-Sent Events).

Leaving a stream early (``break``, ``close()``, ``cancel()``, an exception, task cancellation)
cancels the request on the server: the gRPC call is cancelled, the HTTP connection is closed.
"""

from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, List, Optional, Tuple
from urllib.parse import quote

from .errors import (ModelNotFound, RequestCancelled, RequestTimeout, ServerUnavailable, TritonChatError,
                     error_from_exception, error_from_http)
from .params import GenerationParams, Prompt, build_grpc_inputs, build_json_body
from .results import Completion, Delta, delta_from_infer_result, delta_from_json, has_outputs, \
    is_final_response, merge_deltas
from .sse import SSEParser, decode_event, iter_json_objects

__all__ = ["ChatClient", "AsyncChatClient", "DeltaStream", "AsyncDeltaStream", "Health",
           "DEFAULT_PORTS", "normalize_url"]

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
_POLL_S = 0.2  # how often a blocked sync gRPC reader looks at cancel/timeout


@dataclass
class Health:
    live: bool
    ready: bool
    model_ready: bool

    def __bool__(self) -> bool:  # truthy when requests can be served
        return self.live and self.ready and self.model_ready


def normalize_url(url: Optional[str], protocol: str) -> str:
    """``host:port`` (scheme, path and trailing slash dropped; the protocol's default port added)."""
    protocol = _check_protocol(protocol)
    if not url:
        return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
    url = url.strip()
    for scheme in ("http://", "https://", "grpc://", "dns:///"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    url = url.split("/", 1)[0]
    host, port = _split_host_port(url)
    if port is None:
        port = DEFAULT_PORTS[protocol]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(url: str) -> Tuple[str, Optional[int]]:
    if url.startswith("["):  # [ipv6]:port
        host, _, rest = url[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:] else None
    if url.count(":") == 1:
        host, port = url.split(":")
        return host or "127.0.0.1", int(port) if port else None
    return url or "127.0.0.1", None


def _check_protocol(protocol: str) -> str:
    p = (protocol or "").lower()
    if p not in DEFAULT_PORTS:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return p


def _params(params: Optional[GenerationParams], overrides: dict) -> GenerationParams:
    if params is None:
        return GenerationParams(**overrides)
    return params.replace(**overrides) if overrides else params


def _http_error_message(raw: bytes) -> str:
    """The ``error`` text of a failed HTTP answer (JSON or SSE body), else the body itself."""
    text = raw.decode("utf-8", errors="replace").strip()
    candidates: List[Any] = []
    if text.startswith("data:"):
        parser = SSEParser()
        for data in parser.feed(raw) + parser.close():
            try:
                candidates.append(json.loads(data))
            except ValueError:
                pass
    else:
        try:
            candidates = iter_json_objects(text)
        except ValueError:
            pass
    for obj in candidates:
        if isinstance(obj, dict) and "error" in obj:
            return str(obj["error"])
    return text or "(empty body)"


def _generate_body_deltas(raw: bytes, status: int) -> List[Delta]:
    """The answer of a non-streaming ``generate`` (raises on an error status or error object)."""
    if status != 200:
        raise error_from_http(status, _http_error_message(raw))
    text = raw.decode("utf-8", errors="replace")
    try:
        objs = iter_json_objects(text)
    except ValueError:
        raise TritonChatError(f"malformed answer from the server: {text[:200]!r}") from None
    for obj in objs:
        if isinstance(obj, dict) and "error" in obj:
            raise error_from_http(500 if "expects model to produce exactly 1" in str(obj["error"]) else 400,
                                  str(obj["error"]))
    return [delta_from_json(o) for o in objs if isinstance(o, dict)]


# --------------------------------------------------------------------------------------------
# sync


class _Control:
    """Shared by a :class:`DeltaStream` and the generator producing it (kept apart so that the
    generator holds no reference to the stream object: dropping the stream closes it at once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.hook: Optional[Callable[[], None]] = None

    def set_cancel_hook(self, hook: Optional[Callable[[], None]]) -> None:
        # Under the lock, so that a cancel() running in another thread finishes before the
        # producer releases the connection that the hook points at.
        with self.lock:
            self.hook = hook
            if hook is not None and self.cancelled:
                _call_quietly(hook)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.hook is not None:
                _call_quietly(self.hook)


class DeltaStream:
    """Iterator of :class:`Delta` for one streamed request.

    * ``for d in stream`` -- the request starts at the first ``next()`` (errors raise there);
    * ``close()`` -- stop (cancels on the server if not finished); also done on ``break`` once the
      stream object is dropped, and on ``with`` exit;
    * ``cancel()`` -- may be called from another thread; the iterating thread then gets
      :class:`RequestCancelled`;
    * ``completion`` -- everything received so far, merged (full text, ids, counts, finish reason).
    """

    def __init__(self, make: Callable[[_Control], Iterator[Delta]]):
        self._control = _Control()
        self._deltas: List[Delta] = []
        self._gen = make(self._control)

    @property
    def cancelled(self) -> bool:
        return self._control.cancelled

    def __iter__(self) -> "DeltaStream":
        return self

    def __next__(self) -> Delta:
        d = next(self._gen)
        self._deltas.append(d)
        return d

    def close(self) -> None:
        try:
            self._gen.close()
        except ValueError:  # running in another thread: cancel instead
            self.cancel()

    def cancel(self) -> None:
        self._control.cancel()
        if inspect.getgeneratorstate(self._gen) != inspect.GEN_RUNNING:
            try:
                self._gen.close()
            except ValueError:
                pass

    @property
    def completion(self) -> Completion:
        return merge_deltas(self._deltas)

    def __enter__(self) -> "DeltaStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._gen.close()
        except Exception:
            pass


class _ClientSettings:
    """Where and how to connect: what the sync and the asyncio client share."""

    def __init__(self, url: Optional[str], protocol: str, model: str, timeout: Optional[float],
                 connect_timeout: float, verbose: bool):
        self.protocol = _check_protocol(protocol)
        self.url = normalize_url(url, self.protocol)
        self.model = model
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.verbose = verbose


class ChatClient(_ClientSettings):
    """Synchronous client.  Thread-safe: concurrent requests from several threads each get their
    own gRPC stream (connections are pooled) or HTTP connection.

    ``timeout``: seconds a request may take in all (gRPC deadline) / may wait for the next bytes
    (HTTP socket timeout); ``None``: no limit.  ``connect_timeout``: for ``health()``.
    """

    def __init__(self, url: Optional[str] = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout: Optional[float] = 600.0, connect_timeout: float = 5.0, verbose: bool = False):
        _ClientSettings.__init__(self, url, protocol, model, timeout, connect_timeout, verbose)
        self._pool: List[Any] = []  # idle tritonclient.grpc clients
        self._pool_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

    # ---- public API ---------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: Optional[GenerationParams] = None, **overrides: Any) -> Completion:
        """The whole answer at once (``stream=False``)."""
        p = _params(params, overrides)
        if self.protocol == "grpc":
            holder = DeltaStream(lambda s: self._grpc_deltas(prompt, p, False, s))
            with holder:
                return merge_deltas(list(holder))
        return merge_deltas(self._http_generate(prompt, p))

    def stream(self, prompt: Prompt, params: Optional[GenerationParams] = None, **overrides: Any) -> DeltaStream:
        """The answer piece by piece (``stream=True``); see :class:`DeltaStream`."""
        p = _params(params, overrides)
        if self.protocol == "grpc":
            return DeltaStream(lambda s: self._grpc_deltas(prompt, p, True, s))
        return DeltaStream(lambda s: self._http_stream_deltas(prompt, p, s))

    def health(self) -> Health:
        """Server live / ready and model ready; never raises for an unreachable server."""
        if self.protocol == "grpc":
            client = self._acquire()
            try:
                return Health(*(_safe(lambda: client.is_server_live(client_timeout=self.connect_timeout)),
                                _safe(lambda: client.is_server_ready(client_timeout=self.connect_timeout)),
                                _safe(lambda: client.is_model_ready(self.model,
                                                                    client_timeout=self.connect_timeout))))
            finally:
                self._release(client)
        try:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(self.url, connection_timeout=self.connect_timeout,
                                                      network_timeout=self.connect_timeout)
        except Exception:
            return Health(False, False, False)
        try:
            return Health(_safe(client.is_server_live), _safe(client.is_server_ready),
                          _safe(lambda: client.is_model_ready(self.model)))
        finally:
            _safe(client.close)

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> Health:
        """Block until the server and the model are ready; raise :class:`ServerUnavailable` (server
        not ready) or :class:`ModelNotFound` (server ready, model not) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h:
                return h
            if time.monotonic() >= deadline:
                raise _not_ready_error(self.url, self.model, timeout, h)
            time.sleep(interval)

    def close(self) -> None:
        self._closed = True
        with self._pool_lock:
            clients, self._pool = self._pool, []
        for c in clients:
            _safe(c.close)

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- gRPC ---------------------------------------------------------------------------------

    def _acquire(self):
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        import tritonclient.grpc as grpcclient

        try:
            return grpcclient.InferenceServerClient(url=self.url, verbose=self.verbose)
        except Exception as exc:
            raise error_from_exception(exc) from exc

    def _release(self, client) -> None:
        with self._pool_lock:
            if not self._closed and len(self._pool) < 16:
                self._pool.append(client)
                return
        _safe(client.close)

    def _grpc_deltas(self, prompt: Prompt, params: GenerationParams, stream: bool,
                     handle: _Control) -> Iterator[Delta]:
        inputs = build_grpc_inputs(prompt, params, stream)
        client = self._acquire()
        responses: "queue.SimpleQueue[Tuple[Any, Any]]" = queue.SimpleQueue()
        finished = False
        started = time.monotonic()
        try:
            try:
                client.start_stream(callback=lambda result, error: responses.put((result, error)),
                                    stream_timeout=self.timeout)
                handle.set_cancel_hook(lambda: client.stop_stream(cancel_requests=True))
                client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            except Exception as exc:
                # The stream may already be dead (e.g. connection refused): the real reason
                # is then in the callback's queue, not in the exception.
                try:
                    _, error = responses.get(timeout=1.0)
                except queue.Empty:
                    error = None
                raise error_from_exception(error if error is not None else exc) from None
            while True:
                try:
                    result, error = responses.get(timeout=_POLL_S)
                except queue.Empty:
                    if handle.cancelled:
                        raise RequestCancelled("request cancelled by the client") from None
                    if self.timeout is not None and time.monotonic() - started > self.timeout + 5.0:
                        raise RequestTimeout(f"no answer within {self.timeout} s") from None
                    continue
                if error is not None:
                    if handle.cancelled:
                        raise RequestCancelled("request cancelled by the client")
                    raise error_from_exception(error)
                final = is_final_response(result)
                if has_outputs(result):
                    delta = delta_from_infer_result(result)
                    if final is None and delta.finish_reason is not None:
                        final = True  # a server that does not send the final-response flag
                    yield delta
                if final:
                    finished = True
                    return
        finally:
            handle.set_cancel_hook(None)
            try:
                # finished: half-close and let the server end the stream; else cancel the request
                client.stop_stream(cancel_requests=not finished)
            except Exception:
                pass
            self._release(client)

    # ---- HTTP ---------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        host, port = _split_host_port(self.url)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _path(self, stream: bool) -> str:
        return f"/v2/models/{quote(self.model, safe='')}/generate" + ("_stream" if stream else "")

    def _http_generate(self, prompt: Prompt, params: GenerationParams) -> List[Delta]:
        body = json.dumps(build_json_body(prompt, params, False)).encode("utf-8")
        conn = self._connection()
        try:
            try:
                conn.request("POST", self._path(False), body=body,
                             headers={"Content-Type": "application/json", "Accept": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
            except Exception as exc:
                raise error_from_exception(exc) from None
            return _generate_body_deltas(raw, resp.status)
        finally:
            conn.close()

    def _http_stream_deltas(self, prompt: Prompt, params: GenerationParams,
                            handle: _Control) -> Iterator[Delta]:
        body = json.dumps(build_json_body(prompt, params, True)).encode("utf-8")
        conn = self._connection()

        def cancel() -> None:  # wakes a reader blocked in recv() (close() alone may not)
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        try:
            handle.set_cancel_hook(cancel)
            try:
                conn.request("POST", self._path(True), body=body,
                             headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
                resp = conn.getresponse()
            except Exception as exc:
                if handle.cancelled:
                    raise RequestCancelled("request cancelled by the client") from None
                raise error_from_exception(exc) from None
            if resp.status != 200:
                raise error_from_http(resp.status, _http_error_message(_read_quietly(resp)))
            parser = SSEParser()
            while True:
                try:
                    chunk = resp.read1(65536)
                except Exception as exc:
                    if handle.cancelled:
                        raise RequestCancelled("request cancelled by the client") from None
                    raise error_from_exception(exc) from None
                if not chunk:
                    break
                for data in parser.feed(chunk):
                    yield delta_from_json(decode_event(data))
            if handle.cancelled:
                raise RequestCancelled("request cancelled by the client")
            for data in parser.close():
                yield delta_from_json(decode_event(data))
        finally:
            handle.set_cancel_hook(None)
            conn.close()  # an unfinished request is cancelled by Triton when the connection drops


def _call_quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        pass


def _read_quietly(resp) -> bytes:
    try:
        return resp.read()
    except Exception:
        return b""


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return bool(fn())
    except Exception:
        return False


def _not_ready_error(url: str, model: str, timeout: float, h: Health) -> TritonChatError:
    if h.live and h.ready and not h.model_ready:
        return ModelNotFound(f"model {model!r} is not ready on {url} after {timeout:g} s")
    return ServerUnavailable(f"server at {url} is not ready after {timeout:g} s "
                             f"(live={h.live}, ready={h.ready}, model ready={h.model_ready})")


# --------------------------------------------------------------------------------------------
# asyncio


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


class AsyncChatClient(_ClientSettings):
    """asyncio client with the same API as :class:`ChatClient` (``await`` its methods; ``stream``
    returns an :class:`AsyncDeltaStream`).  Create it anywhere; connections are opened inside the
    running loop on first use.  Close with ``await client.close()`` or ``async with``."""

    def __init__(self, url: Optional[str] = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout: Optional[float] = 600.0, connect_timeout: float = 5.0, verbose: bool = False):
        _ClientSettings.__init__(self, url, protocol, model, timeout, connect_timeout, verbose)
        self._grpc = None
        self._session = None

    def __repr__(self) -> str:
        return f"AsyncChatClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

    async def generate(self, prompt: Prompt, params: Optional[GenerationParams] = None,
                       **overrides: Any) -> Completion:
        p = _params(params, overrides)
        if self.protocol == "grpc":
            agen = self._grpc_deltas(prompt, p, False)
            try:
                return merge_deltas([d async for d in agen])
            finally:
                await agen.aclose()
        return merge_deltas(await self._http_generate(prompt, p))

    def stream(self, prompt: Prompt, params: Optional[GenerationParams] = None,
               **overrides: Any) -> AsyncDeltaStream:
        p = _params(params, overrides)
        if self.protocol == "grpc":
            return AsyncDeltaStream(self._grpc_deltas(prompt, p, True))
        return AsyncDeltaStream(self._http_stream_deltas(prompt, p))

    async def health(self) -> Health:
        t = self.connect_timeout
        if self.protocol == "grpc":
            client = await self._grpc_client()
            return Health(await _asafe(client.is_server_live(client_timeout=t)),
                          await _asafe(client.is_server_ready(client_timeout=t)),
                          await _asafe(client.is_model_ready(self.model, client_timeout=t)))
        import tritonclient.http.aio as aiohttpclient

        client = aiohttpclient.InferenceServerClient(self.url, conn_timeout=t)
        try:
            return Health(await _asafe(client.is_server_live()), await _asafe(client.is_server_ready()),
                          await _asafe(client.is_model_ready(self.model)))
        finally:
            await _asafe(client.close())

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> Health:
        deadline = time.monotonic() + timeout
        while True:
            h = await self.health()
            if h:
                return h
            if time.monotonic() >= deadline:
                raise _not_ready_error(self.url, self.model, timeout, h)
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

        call = None
        finished = False
        try:
            try:
                call = client.stream_infer(requests(), stream_timeout=self.timeout)
            except Exception as exc:
                raise error_from_exception(exc) from None
            while True:
                try:
                    result, error = await call.__anext__()
                except StopAsyncIteration:
                    finished = True
                    return
                except Exception as exc:  # grpc.aio.AioRpcError, InferenceServerException, ...
                    raise error_from_exception(exc) from None
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
                                    headers={"Content-Type": "application/json"}) as resp:
                raw = await resp.read()
                status = resp.status
        except TritonChatError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise error_from_exception(exc) from None
        return _generate_body_deltas(raw, status)

    async def _http_stream_deltas(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[Delta]:
        session = await self._http_session()
        body = json.dumps(build_json_body(prompt, params, True)).encode("utf-8")
        resp = None
        finished = False
        try:
            try:
                resp = await session.post(self._endpoint(True), data=body,
                                          headers={"Content-Type": "application/json",
                                                   "Accept": "text/event-stream"})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise error_from_exception(exc) from None
            if resp.status != 200:
                raise error_from_http(resp.status, _http_error_message(await resp.read()))
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

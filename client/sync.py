"""The synchronous chat client (:class:`ChatClient`) and its stream of deltas (:class:`DeltaStream`);
see :mod:`.api` for what both clients share."""

from __future__ import annotations

import http.client
import inspect
import json
import queue
import socket
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple
from urllib.parse import quote

from .api import ClientSettings, Health, generate_body_deltas, http_error_message, not_ready_error, \
    resolve_params, split_host_port
from .errors import RequestCancelled, RequestTimeout, error_from_exception, error_from_http
from .params import GenerationParams, Prompt, build_grpc_inputs, build_json_body
from .results import Completion, Delta, delta_from_infer_result, delta_from_json, has_outputs, \
    is_final_response, merge_deltas
from .sse import SSEParser, decode_event

__all__ = ["ChatClient", "DeltaStream"]

_POLL_S = 0.2  # how often a blocked sync gRPC reader looks at cancel/timeout


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


class ChatClient(ClientSettings):
    """Synchronous client.  Thread-safe: concurrent requests from several threads each get their
    own gRPC stream (connections are pooled) or HTTP connection.

    ``timeout``: seconds a request may take in all (gRPC deadline) / may wait for the next bytes
    (HTTP socket timeout); ``None``: no limit.  ``connect_timeout``: for ``health()``.
    """

    def __init__(self, url: Optional[str] = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout: Optional[float] = 600.0, connect_timeout: float = 5.0, verbose: bool = False,
                 api_key: Optional[str] = None):
        ClientSettings.__init__(self, url, protocol, model, timeout, connect_timeout, verbose, api_key)
        self._pool: List[Any] = []  # idle tritonclient.grpc clients
        self._pool_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

    # ---- public API ---------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: Optional[GenerationParams] = None, **overrides: Any) -> Completion:
        """The whole answer at once (``stream=False``)."""
        p = resolve_params(params, overrides)
        if self.protocol == "grpc":
            holder = DeltaStream(lambda s: self._grpc_deltas(prompt, p, False, s))
            with holder:
                return merge_deltas(list(holder))
        return merge_deltas(self._http_generate(prompt, p))

    def stream(self, prompt: Prompt, params: Optional[GenerationParams] = None, **overrides: Any) -> DeltaStream:
        """The answer piece by piece (``stream=True``); see :class:`DeltaStream`."""
        p = resolve_params(params, overrides)
        if self.protocol == "grpc":
            return DeltaStream(lambda s: self._grpc_deltas(prompt, p, True, s))
        return DeltaStream(lambda s: self._http_stream_deltas(prompt, p, s))

    def health(self) -> Health:
        """Server live / ready and model ready; never raises for an unreachable server."""
        if self.protocol == "grpc":
            client = self._acquire()
            h, t = self.headers, self.connect_timeout
            try:
                return Health(*(_safe(lambda: client.is_server_live(headers=h, client_timeout=t)),
                                _safe(lambda: client.is_server_ready(headers=h, client_timeout=t)),
                                _safe(lambda: client.is_model_ready(self.model, headers=h, client_timeout=t))))
            finally:
                self._release(client)
        try:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(self.url, connection_timeout=self.connect_timeout,
                                                      network_timeout=self.connect_timeout)
        except Exception:
            return Health(False, False, False)
        try:
            h = self.headers
            return Health(_safe(lambda: client.is_server_live(headers=h)),
                          _safe(lambda: client.is_server_ready(headers=h)),
                          _safe(lambda: client.is_model_ready(self.model, headers=h)))
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
                raise not_ready_error(self.url, self.model, timeout, h)
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
                                    stream_timeout=self.timeout, headers=self.headers or None)
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
        host, port = split_host_port(self.url)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _path(self, stream: bool) -> str:
        return f"/v2/models/{quote(self.model, safe='')}/generate" + ("_stream" if stream else "")

    def _http_generate(self, prompt: Prompt, params: GenerationParams) -> List[Delta]:
        body = json.dumps(build_json_body(prompt, params, False)).encode("utf-8")
        conn = self._connection()
        try:
            try:
                conn.request("POST", self._path(False), body=body,
                             headers={"Content-Type": "application/json", "Accept": "application/json",
                                      **self.headers})
                resp = conn.getresponse()
                raw = resp.read()
            except Exception as exc:
                raise error_from_exception(exc) from None
            return generate_body_deltas(raw, resp.status)
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
                             headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                                      **self.headers})
                resp = conn.getresponse()
            except Exception as exc:
                if handle.cancelled:
                    raise RequestCancelled("request cancelled by the client") from None
                raise error_from_exception(exc) from None
            if resp.status != 200:
                raise error_from_http(resp.status, http_error_message(_read_quietly(resp)))
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

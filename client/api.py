"""What the chat clients for the ``ensemble`` (docs/contract.md) share: where to connect, the server's
health, and reading a non-streamed HTTP answer.

The clients: :mod:`.sync` (``ChatClient``, threads) and :mod:`.aio` (``AsyncChatClient``, asyncio); both
speak gRPC or HTTP.

gRPC: every request, streamed or not, goes through the bidirectional ``ModelStreamInfer`` stream
(the generator step is decoupled; Triton refuses unary inference for decoupled models).  The
non-streaming call sends ``stream=False`` and collects the single answer.
HTTP: Triton's generate extension, ``POST /v2/models/{model}/generate`` (one JSON answer) and
``.../generate_stream`` (Server-Sent Events).

Leaving a stream early (``break``, ``close()``, ``cancel()``, an exception, task cancellation)
cancels the request on the server: the gRPC call is cancelled, the HTTP connection is closed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from tritonchat.security import key_headers

from .errors import ModelNotFound, ServerUnavailable, TritonChatError, error_from_http
from .params import GenerationParams
from .results import Delta, delta_from_json
from .sse import SSEParser, iter_json_objects

__all__ = ["Health", "DEFAULT_PORTS", "normalize_url", "ENV_API_KEY", "resolve_api_key"]

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
ENV_API_KEY = "TRITONCHAT_API_KEY"  # the key a client sends when none is given (`tritonchat serve --api-key-file`)


@dataclass
class Health:
    live: bool
    ready: bool
    model_ready: bool

    def __bool__(self) -> bool:  # truthy when requests can be served
        return self.live and self.ready and self.model_ready


def normalize_url(url: Optional[str], protocol: str) -> str:
    """``host:port`` (scheme, path and trailing slash dropped; the protocol's default port added)."""
    protocol = check_protocol(protocol)
    if not url:
        return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
    url = url.strip()
    for scheme in ("http://", "https://", "grpc://", "dns:///"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    url = url.split("/", 1)[0]
    host, port = split_host_port(url)
    if port is None:
        port = DEFAULT_PORTS[protocol]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(url: str) -> Tuple[str, Optional[int]]:
    if url.startswith("["):  # [ipv6]:port
        host, _, rest = url[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:] else None
    if url.count(":") == 1:
        host, port = url.split(":")
        return host or "127.0.0.1", int(port) if port else None
    return url or "127.0.0.1", None


def check_protocol(protocol: str) -> str:
    p = (protocol or "").lower()
    if p not in DEFAULT_PORTS:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return p


def resolve_params(params: Optional[GenerationParams], overrides: dict) -> GenerationParams:
    if params is None:
        return GenerationParams(**overrides)
    return params.replace(**overrides) if overrides else params


def http_error_message(raw: bytes) -> str:
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


def generate_body_deltas(raw: bytes, status: int) -> List[Delta]:
    """The answer of a non-streaming ``generate`` (raises on an error status or error object)."""
    if status != 200:
        raise error_from_http(status, http_error_message(raw))
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


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    """`api_key`; when None, ``$TRITONCHAT_API_KEY``; an empty string means: send no key."""
    if api_key is None:
        api_key = os.environ.get(ENV_API_KEY, "")
    return api_key.strip() or None


class ClientSettings:
    """Where and how to connect: what the sync and the asyncio client share.

    ``api_key``: sent with every request (``authorization: Bearer <key>`` over HTTP; over gRPC the same under
    the name Triton expects, ``triton-grpc-protocol-authorization``); None reads ``$TRITONCHAT_API_KEY``."""

    def __init__(self, url: Optional[str], protocol: str, model: str, timeout: Optional[float],
                 connect_timeout: float, verbose: bool, api_key: Optional[str] = None):
        self.protocol = check_protocol(protocol)
        self.url = normalize_url(url, self.protocol)
        self.model = model
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.verbose = verbose
        self.api_key = resolve_api_key(api_key)
        self.headers = key_headers(self.protocol, api_key=self.api_key)  # empty without a key


def not_ready_error(url: str, model: str, timeout: float, h: Health) -> TritonChatError:
    if h.live and h.ready and not h.model_ready:
        return ModelNotFound(f"model {model!r} is not ready on {url} after {timeout:g} s")
    return ServerUnavailable(f"server at {url} is not ready after {timeout:g} s "
                             f"(live={h.live}, ready={h.ready}, model ready={h.model_ready})")

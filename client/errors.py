"""Typed errors of the chat client, and the mapping from what Triton (gRPC, HTTP) reports.

Triton reports an error in three shapes:

* a gRPC status (``StatusCode.INVALID_ARGUMENT`` ...) -- unary calls, a refused or broken stream;
* an HTTP status (400, 404, 503 ...) with a JSON body ``{"error": "..."}``;
* a bare message with no code -- an error *inside* a gRPC stream (``ModelStreamInferResponse.error_message``)
  or an SSE event ``data: {"error": "..."}``: Triton drops the code there, so only the text is left.

The mapping looks at the code first and at well-known message texts second.  A bare message that
matches nothing is an :class:`InvalidRequest` (the ensemble's models refuse bad values with
INVALID_ARG, which is by far the common in-stream error); one that says the Python stub is not
healthy, or an HTTP 500, is a :class:`ServerError`.

A missing or wrong API key (`tritonchat serve --api-key-file`) is an :class:`AccessDenied`: Triton answers
HTTP 403 "This API is restricted, expecting header 'authorization'" and, over gRPC, ``UNAVAILABLE`` (sic)
"This protocol is restricted, expecting header 'triton-grpc-protocol-authorization'"; the text decides.
"""

from __future__ import annotations

import re
from typing import Optional, Union

__all__ = [
    "TritonChatError",
    "InvalidRequest",
    "ModelNotFound",
    "ServerUnavailable",
    "RequestCancelled",
    "RequestTimeout",
    "ServerError",
    "AccessDenied",
    "error_from_status",
    "error_from_http",
    "error_from_exception",
    "GRPC_CORE_INTERNAL",
    "CORE_INTERNAL_ATTEMPTS",
    "CORE_INTERNAL_PAUSE_S",
]

#: what grpc's asyncio client says when a write fails on a stream the server has already ended: Triton
#: ends a stream at once when it refuses it (a missing key), and a request written in that moment gets
#: this instead of Triton's status. Nothing was answered, so the clients send such a request once more
#: on a new stream, whose failure then carries the real status (seen in full test runs, never alone).
GRPC_CORE_INTERNAL = "Internal error from Core"
#: tries of one request that gets GRPC_CORE_INTERNAL before any answer: twice was not always enough in
#: full test runs on 2 cores (both writes met the closing stream), and three back to back once failed
#: all three (a full run, the request after a refused one); so the tries after the first wait
#: CORE_INTERNAL_PAUSE_S times the try's number first. The async client and the gateway both use these.
CORE_INTERNAL_ATTEMPTS = 3
CORE_INTERNAL_PAUSE_S = 0.05


class TritonChatError(Exception):
    """Base of every error the client raises.  ``message`` is the server's text (verbatim)."""

    def __init__(self, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status  # the raw code ("StatusCode.INVALID_ARGUMENT", "400", ...) or None

    def __str__(self) -> str:  # the server's message, nothing added
        return self.message


class InvalidRequest(TritonChatError):
    """The server refused the request (gRPC INVALID_ARGUMENT, HTTP 400); ``message`` says why."""


class ModelNotFound(TritonChatError):
    """The model is unknown to the server (or not loaded)."""


class ServerUnavailable(TritonChatError):
    """Cannot reach the server, the server is not ready, or its queue is full."""


class RequestCancelled(TritonChatError):
    """The request was cancelled (by this client, the server, or the connection)."""


class RequestTimeout(TritonChatError):
    """The request ran past the client's ``timeout``."""


class ServerError(TritonChatError):
    """Anything else the server reports (internal error, unsupported, ...)."""


class AccessDenied(TritonChatError):
    """The server wants an API key this request did not carry (or carried a wrong one)."""


_GRPC_CODE = {
    "INVALID_ARGUMENT": InvalidRequest,
    "OUT_OF_RANGE": InvalidRequest,
    "FAILED_PRECONDITION": InvalidRequest,
    "ALREADY_EXISTS": InvalidRequest,
    "NOT_FOUND": ModelNotFound,
    "UNAVAILABLE": ServerUnavailable,
    "RESOURCE_EXHAUSTED": ServerUnavailable,
    "CANCELLED": RequestCancelled,
    "DEADLINE_EXCEEDED": RequestTimeout,
    "INTERNAL": ServerError,
    "UNKNOWN": ServerError,
    "UNIMPLEMENTED": ServerError,
    "DATA_LOSS": ServerError,
    "ABORTED": ServerError,
    "PERMISSION_DENIED": AccessDenied,
    "UNAUTHENTICATED": AccessDenied,
}

# Message texts that say more than the code (or stand in for a code that was dropped).
_MESSAGE_RULES = [
    (re.compile(r"this (?:api|protocol) is restricted", re.I), AccessDenied),
    (re.compile(r"unknown model|model '[^']*' (?:is )?not found|is not found|"
                r"no model|model is not ready|not ready for inference|unavailable model|"
                r"model .* is not (?:loaded|available)", re.I), ModelNotFound),
    (re.compile(r"exceeds maximum queue size|queue (?:is )?full|server is not ready|"
                r"failed to connect|connection refused|connect failed|"
                r"socket closed|server unavailable|unavailable|"
                # a model's process died (Triton's words, any code): the server restarts it under `serve`
                r"stub process (?:'[^']*' )?(?:is )?not healthy", re.I), ServerUnavailable),
    (re.compile(r"\bcancel+ed\b|\bcancel+ation\b", re.I), RequestCancelled),
    (re.compile(r"deadline exceeded|timed out|timeout", re.I), RequestTimeout),
    (re.compile(r"internal error|segmentation fault", re.I), ServerError),
]


def _by_message(message: str):
    for pattern, cls in _MESSAGE_RULES:
        if pattern.search(message or ""):
            return cls
    return None


def _grpc_code_name(status) -> Optional[str]:
    """'StatusCode.INVALID_ARGUMENT' / 'INVALID_ARGUMENT' / grpc.StatusCode.X -> 'INVALID_ARGUMENT'."""
    if status is None:
        return None
    name = getattr(status, "name", None)  # grpc.StatusCode enum member
    if name is None:
        name = str(status)
    name = name.strip()
    if name.startswith("StatusCode."):
        name = name[len("StatusCode."):]
    return name.upper() if name and not name.isdigit() else None


def error_from_http(code: int, message: str) -> TritonChatError:
    """Map an HTTP status + the server's ``error`` text to a typed error."""
    status = str(code)
    by_msg = _by_message(message)
    if code in (401, 403) or by_msg is AccessDenied:
        cls = AccessDenied
    elif code == 404:
        cls = ModelNotFound
    elif code in (503, 429, 502, 504):
        cls = ServerUnavailable if code != 504 else RequestTimeout
    elif code == 499:
        cls = RequestCancelled
    elif 400 <= code < 500:
        # Triton sends 400 for INVALID_ARG, UNKNOWN, ALREADY_EXISTS and CANCELLED alike.
        cls = by_msg if by_msg in (ModelNotFound, RequestCancelled, ServerUnavailable) else InvalidRequest
    elif code >= 500:
        cls = by_msg if by_msg in (ModelNotFound, ServerUnavailable) else ServerError
    else:
        cls = by_msg or ServerError
    return cls(message, status)


def error_from_status(status: Union[str, int, None], message: str) -> TritonChatError:
    """Map a status (gRPC name, grpc.StatusCode, HTTP code as int or digit string, or None) + message."""
    if isinstance(status, int) or (isinstance(status, str) and status.strip().isdigit()):
        return error_from_http(int(status), message)
    name = _grpc_code_name(status)
    raw = None if status is None else str(status)
    by_msg = _by_message(message)
    if name is not None and name in _GRPC_CODE:
        cls = _GRPC_CODE[name]
        if by_msg is AccessDenied:  # Triton refuses a missing key with UNAVAILABLE, which is not retryable here
            cls = AccessDenied
        # A better-informed message wins over generic codes (Triton reports an unknown model
        # as INVALID_ARGUMENT from some paths and a full queue as UNAVAILABLE/RESOURCE_EXHAUSTED).
        if by_msg is ModelNotFound and cls in (InvalidRequest, ServerError, ServerUnavailable):
            cls = ModelNotFound
        elif by_msg is ServerUnavailable and cls in (InvalidRequest, ServerError):
            cls = ServerUnavailable
        return cls(message, raw)
    # No code (an in-stream error or an SSE error event): go by the text.
    return (by_msg or InvalidRequest)(message, raw)


def error_from_exception(exc: BaseException) -> TritonChatError:
    """Map any exception met while talking to the server to a :class:`TritonChatError`."""
    if isinstance(exc, TritonChatError):
        return exc
    try:
        from tritonclient.utils import InferenceServerException
    except Exception:  # pragma: no cover - tritonclient is a dependency
        InferenceServerException = ()  # type: ignore
    if InferenceServerException and isinstance(exc, InferenceServerException):
        return error_from_status(exc.status(), exc.message() or str(exc))
    try:
        import grpc

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            return error_from_status(exc.code(), exc.details() or str(exc))
    except ImportError:  # pragma: no cover
        pass
    import asyncio
    import socket

    if isinstance(exc, (asyncio.TimeoutError, socket.timeout, TimeoutError)):
        return RequestTimeout(f"request timed out: {exc}" if str(exc) else "request timed out")
    if isinstance(exc, asyncio.CancelledError):
        return RequestCancelled("request cancelled")
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientConnectorError):
            return ServerUnavailable(f"cannot connect to the server: {exc}")
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return ServerUnavailable(f"the server closed the connection: {exc}")
        if isinstance(exc, aiohttp.ClientError):
            return ServerUnavailable(f"HTTP client error: {exc}")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (ConnectionError, OSError)):
        return ServerUnavailable(f"cannot reach the server: {exc}")
    import http.client

    if isinstance(exc, http.client.HTTPException):
        return ServerUnavailable(f"HTTP protocol error: {exc!r}")
    return TritonChatError(f"{type(exc).__name__}: {exc}")

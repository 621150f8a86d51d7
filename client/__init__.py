"""Clients for the tritonchat ``ensemble`` (docs/contract.md) over gRPC or HTTP, sync and asyncio.

``sync.py`` (ChatClient), ``aio.py`` (AsyncChatClient), ``api.py`` (what both share); ``params.py`` (the request),
``results.py`` (the answer), ``errors.py``, ``sse.py`` (Server-Sent Events), ``cli_chat.py`` (`tritonchat chat`).

    from tritonchat.client import ChatClient, GenerationParams

    with ChatClient("127.0.0.1:8001", protocol="grpc") as client:
        client.wait_ready(timeout=60)
        print(client.generate("Once upon a time", max_tokens=32).text)
        for delta in client.stream("Hello", GenerationParams(max_tokens=16, temperature=0.7, seed=1)):
            print(delta.text, end="", flush=True)
"""

from .aio import AsyncChatClient, AsyncDeltaStream
from .api import DEFAULT_PORTS, ENV_API_KEY, Health, normalize_url
from .errors import (AccessDenied, InvalidRequest, ModelNotFound, RequestCancelled, RequestTimeout, ServerError,
                     ServerUnavailable, TritonChatError, error_from_exception, error_from_http, error_from_status)
from .params import GenerationParams, Prompt, build_arrays, build_grpc_inputs, build_json_body
from .results import Completion, Delta
from .sse import SSEParser, parse_sse
from .sync import ChatClient, DeltaStream

__all__ = [
    "ChatClient", "AsyncChatClient", "DeltaStream", "AsyncDeltaStream", "Health", "DEFAULT_PORTS", "ENV_API_KEY",
    "normalize_url",
    "GenerationParams", "Prompt", "Completion", "Delta",
    "TritonChatError", "InvalidRequest", "ModelNotFound", "ServerUnavailable", "RequestCancelled",
    "RequestTimeout", "ServerError", "AccessDenied", "error_from_exception", "error_from_http", "error_from_status",
    "build_arrays", "build_grpc_inputs", "build_json_body", "SSEParser", "parse_sse",
]

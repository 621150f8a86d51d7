"""The gateway's HTTP application: ``create_app(config)`` (FastAPI).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models[/{model}]``
(these need the key when a key file is set), ``GET /health/live``, ``GET /health/ready`` (200 only
while Triton's entry model is ready), ``GET|HEAD /metrics`` (the gateway's metrics, then Triton's),
``GET /`` (the web playground, gateway/static/index.html).

A request goes: body (at most ``max_body_bytes``: 413) -> key (401) -> limits (429) -> validation
(400) -> known model (404) -> :class:`generation.Generation` (cache, Triton, 503 when overloaded).

The two generation endpoints are dispatched before FastAPI's middleware and routing (``_GatewayApp``):
they parse and validate their bodies themselves, and the ten ASGI layers FastAPI puts around every
request and every streamed chunk were a measurable part of the gateway's CPU at 16 streams
(docs/gateway.md, "Benchmarks"). Everything else is plain FastAPI.
"""

from __future__ import annotations

import contextlib
import logging
from importlib import resources
from typing import Awaitable, Callable, Dict, Optional, Type, Union

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest
from starlette.responses import HTMLResponse, JSONResponse, Response

from tritonchat.security import Access

from .auth import KeyEntry, KeyStore
from .cache import open_cache
from .config import GatewayConfig
from .errors import APIError, bad_request, from_validation
from .generation import Generation
from .limits import Limiter
from .metrics import GatewayMetrics
from .schemas import ChatRequest, CompletionRequest, prepare
from .upstream import FALLBACK_MAX_TOKENS, Upstream

__all__ = ["create_app"]

log = logging.getLogger("tritonchat.gateway")


class _State:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.keys = KeyStore(config.api_key_file)
        self.triton_keys = Access.from_files(config.triton_api_key_file, config.triton_admin_key_file)
        self.limiter = Limiter()
        self.metrics = GatewayMetrics()
        self.upstream: Optional[Upstream] = None
        self.generation: Optional[Generation] = None
        self.created = 0


class _GatewayApp(FastAPI):
    """FastAPI, with ``POST`` to the generation endpoints answered directly (same handler, same errors)."""

    direct: Dict[str, Callable[[Request], Awaitable[Response]]] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.direct.get(scope["path"])
            if handler is not None:
                await _answer_directly(handler, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _answer_directly(handler, scope, receive, send) -> None:
    try:
        response = await handler(StarletteRequest(scope, receive))
    except APIError as exc:
        response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    except Exception as exc:  # noqa: BLE001 - what FastAPI's handler for Exception answers
        response = _internal_error(exc)
    await response(scope, receive, send)


def _internal_error(exc: Exception) -> JSONResponse:
    log.exception("unexpected error while answering a request")
    err = APIError(500, f"internal error in the gateway: {type(exc).__name__}", "server_error")
    return JSONResponse(err.body(), status_code=500)


def create_app(config: GatewayConfig) -> FastAPI:
    """The app for `config`; Triton is reached lazily, so the gateway may start before Triton is ready."""
    state = _State(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        import time

        state.created = int(time.time())
        keys = state.triton_keys
        state.upstream = Upstream(config.triton_url, config.model, config.metrics_url, config.request_timeout_s,
                                  api_key=keys.api_key, admin_key=None if keys.admin_key_generated else keys.admin_key)
        cache = open_cache(config.cache, config.cache_ttl_s, config.cache_max_entries, config.cache_max_bytes)
        state.generation = Generation(state.upstream, cache, state.metrics)
        try:
            yield
        finally:
            await cache.close()
            await state.upstream.close()

    app = _GatewayApp(title="tritonchat gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = state

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), "invalid_request_error",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        return _internal_error(exc)

    # ---- service endpoints ----------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(resources.files(__package__).joinpath("static", "index.html").read_text("utf-8"))

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if await state.upstream.ready():
            return {"status": "ready", "model": config.model}
        raise APIError(503, f"Triton's model {config.model!r} is not ready at {config.triton_url}", "server_error",
                       code="not_ready", headers={"Retry-After": "1"})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics(request: Request):
        media = "text/plain; version=0.0.4; charset=utf-8"
        if request.method == "HEAD":  # AIPerf probes with HEAD first
            return Response(status_code=200, media_type=media)
        n = state.generation.cache.entries()
        if n is not None:
            state.metrics.cache_entries.set(n)
        relayed = await state.upstream.metrics_text()
        state.metrics.upstream_metrics_up.set(1 if relayed is not None else 0)
        body = state.metrics.render()
        if relayed:
            body += b"\n" + relayed.encode("utf-8")
        return Response(body, media_type=media)

    # ---- OpenAI endpoints -----------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request):
        _authenticate(state, request)
        return {"object": "list", "data": [_model_card(state, n) for n in config.model_names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        _authenticate(state, request)
        if model not in config.model_names:
            raise _unknown_model(model)
        return _model_card(state, model)

    # routed by FastAPI only for what _GatewayApp does not take (other methods: 405)
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(state, request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(state, request, CompletionRequest, "completions")

    app.direct = {"/v1/chat/completions": chat_completions, "/v1/completions": completions}
    return app


def _model_card(state: _State, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "tritonchat"}


def _unknown_model(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found")


def _authenticate(state: _State, request: Request) -> KeyEntry:
    header = request.headers.get("authorization")
    entry = state.keys.check(header)
    if entry is None:
        state.metrics.auth_failures.inc()
        if not header:
            msg = ("You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
                   "(Authorization: Bearer YOUR_KEY).")
        else:
            msg = "Incorrect API key provided."  # the key itself is never echoed or logged
        raise APIError(401, msg, "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return entry


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _generate(state: _State, request: Request, schema: Type[Union[ChatRequest, CompletionRequest]],
                    endpoint: str) -> Response:
    config = state.config
    try:
        raw = await _read_body(request, config.max_body_bytes)
        entry = _authenticate(state, request)
    except APIError as exc:
        state.metrics.requests.labels(endpoint, str(exc.status)).inc()
        raise
    try:
        lease = state.limiter.acquire(entry.name, state.keys.limits_for(entry, config.limits))
    except APIError as exc:
        state.metrics.limited.labels(exc.code or "limit").inc()
        state.metrics.requests.labels(endpoint, "429").inc()
        log.info("429 for %s: %s", entry.name, exc.code)
        raise
    try:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request(f"The request body is not valid UTF-8 (byte {exc.start}).", None, "invalid_encoding")
        try:
            req = schema.model_validate_json(raw)
        except ValidationError as exc:
            raise from_validation(exc.errors()) from None
        if req.model not in config.model_names:
            raise _unknown_model(req.model)
        has_max = req.max_tokens or getattr(req, "max_completion_tokens", None)
        default_max = config.default_max_tokens or (None if has_max else await state.upstream.context_length())
        prep = prepare(req, default_max_tokens=default_max or FALLBACK_MAX_TOKENS,
                       max_stop=config.max_stop_sequences, max_stop_chars=config.max_stop_chars)
    except APIError as exc:
        lease.release()
        state.metrics.requests.labels(endpoint, str(exc.status)).inc()
        raise
    except BaseException:
        lease.release()
        raise
    try:
        return await state.generation.answer(request, prep, lease, endpoint)
    except APIError as exc:
        state.metrics.requests.labels(endpoint, str(exc.status)).inc()
        if exc.status >= 500:
            log.warning("%d for %s: %s", exc.status, entry.name, exc.message)
        raise

"""The OpenAI-compatible gateway in front of Triton (FastAPI + uvicorn, gRPC streaming to the entry model).

    from tritonchat.gateway import GatewayConfig, create_app, run

    run(GatewayConfig(triton_url="127.0.0.1:8001", metrics_url="127.0.0.1:8002", port=9000))   # blocks

``config.py`` (GatewayConfig), ``app.py`` (create_app: routes, auth, limits), ``generation.py`` (one
request: cache, Triton stream, SSE), ``schemas.py`` (request bodies), ``responses.py`` (OpenAI objects),
``upstream.py`` (Triton), ``cache.py``, ``auth.py``, ``limits.py``, ``metrics.py``, ``errors.py``,
``server.py`` (run), ``process.py`` (the gateway as a child process, stopped by pid: what `serve`, `bench`
and the tests start), ``static/index.html`` (the playground). Guide: docs/gateway.md.
"""

from .config import GatewayConfig, Limits, load_config

__all__ = ["GatewayConfig", "Limits", "load_config", "create_app", "run"]


def create_app(config: GatewayConfig):
    from .app import create_app as _create

    return _create(config)


def run(config: GatewayConfig) -> int:
    from .server import run as _run

    return _run(config)

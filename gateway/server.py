"""Run the gateway: ``run(config)`` serves :func:`tritonchat.gateway.app.create_app` with uvicorn in the
foreground until SIGINT/SIGTERM (``tritonchat gateway``, ``python -m tritonchat.gateway``)."""

from __future__ import annotations

import logging
import sys

from .config import GatewayConfig

__all__ = ["run"]


def run(config: GatewayConfig) -> int:
    """Blocks until the server stops; returns the exit status (2: the key file or cache is unusable)."""
    import uvicorn

    from .app import create_app
    from tritonchat.security import KeyFileError as TritonKeyFileError

    from .auth import KeyFileError
    from .cache import redact_url

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(config)
    except (KeyFileError, TritonKeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tritonchat gateway: http://{config.host}:{config.port}  ->  Triton gRPC {config.triton_url} "
          f"(model {config.model!r}, cache {redact_url(config.cache)}, "
          f"keys {'on' if config.api_key_file else 'off'})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           access_log=config.access_log, timeout_graceful_shutdown=5,
                                           lifespan="on"))
    server.run()
    return 0 if server.started else 1

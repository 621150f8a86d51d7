"""Locust load test for the ensemble: an HTTP ``generate_stream`` user and a gRPC streaming user.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 --grpc-host 127.0.0.1:8001 \\
        -u 4 -r 4 --run-time 30s --max-requests-per-user 20 --max-tokens 64 --csv out/locust

Pick one user class by naming it last (``... HttpStreamUser`` or ``GrpcStreamUser``); both run by default.

Besides the request itself (``request_type`` "HTTP" / "gRPC", name ``generate_stream``: end-to-end
time, failures), every request records, as locust entries of their own (so they show in the stats,
the CSV files and the charts; the "response time" column holds the figure named):

* ``TTFT``   -- time to first token (ms);
* ``ITL``    -- inter-token latency (ms), one entry per token after the first;
* ``TOKENS/S`` -- this request's output tokens per second after the first token (the column holds
  tokens/s, not ms); ``response_length`` is the number of output tokens.

Bounds: ``--run-time`` and ``-u`` as usual, and ``--max-requests-per-user`` (a user stops after that
many requests; 0 = no limit). Only loopback hosts are accepted (127.0.0.0/8, ::1, localhost): any
other ``--host`` / ``--grpc-host`` stops the run before a request is sent.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional

from locust import User, between, events, task
from locust.exception import StopUser

try:  # grpc's C core must cooperate with gevent, or a blocked stream freezes every greenlet
    import grpc.experimental.gevent as _grpc_gevent

    _grpc_gevent.init_gevent()
except Exception:  # pragma: no cover - grpc without gevent support
    _grpc_gevent = None

try:
    from tritonchat.loadtest.net import NotLoopback, check_loopback
except ImportError:  # run as a plain file next to net.py
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    from net import NotLoopback, check_loopback  # type: ignore

log = logging.getLogger("tritonchat.locust")

DEFAULT_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--grpc-host", default="127.0.0.1:8001", help="gRPC host:port (loopback only)")
    parser.add_argument("--model-name", default="ensemble")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (min_tokens too)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-requests-per-user", type=int, default=20,
                        help="a user stops after this many requests (0: no limit)")


@events.init.add_listener
def _refuse_non_loopback(environment, **_kw):
    opts = environment.parsed_options
    targets = [environment.host or "http://127.0.0.1:8000"]
    if opts is not None:
        targets.append(opts.grpc_host)
    for target in targets:
        try:
            check_loopback(target)
        except NotLoopback as exc:
            log.error("%s", exc)
            sys.stderr.write(f"error: {exc}\n")
            if environment.runner is not None:
                environment.runner.quit()
            raise SystemExit(2)


def _fire(environment, request_type: str, name: str, value: float, length: int = 0, exc=None) -> None:
    environment.events.request.fire(request_type=request_type, name=name, response_time=value,
                                    response_length=length, exception=exc, context={})


class _StreamUser(User):
    abstract = True
    wait_time = between(0.0, 0.05)
    protocol = "http"
    label = "HTTP"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.max_tokens = getattr(opts, "max_tokens", 64)
        self.prompt = getattr(opts, "prompt", DEFAULT_PROMPT)
        self.limit = getattr(opts, "max_requests_per_user", 20)
        self.sent = 0
        url = (self.host or "http://127.0.0.1:8000") if self.protocol == "http" else getattr(
            opts, "grpc_host", "127.0.0.1:8001")
        check_loopback(url)  # belt and braces: never anything but loopback
        from tritonchat.client import ChatClient

        self.client = ChatClient(url, protocol=self.protocol, model=getattr(opts, "model_name", "ensemble"),
                                 timeout=120.0)

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    @task
    def generate_stream(self) -> None:
        if self.limit and self.sent >= self.limit:
            raise StopUser()
        self.sent += 1
        env, name = self.environment, f"{self.label} generate_stream"
        t0 = time.perf_counter()
        first: Optional[float] = None
        prev = t0
        tokens = 0
        error: Optional[Exception] = None
        try:
            with self.client.stream(self.prompt, max_tokens=self.max_tokens, min_tokens=self.max_tokens,
                                    temperature=0.0) as stream:
                for delta in stream:
                    k = len(delta.output_ids)
                    if k == 0:
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        _fire(env, "TTFT", name, (now - t0) * 1e3)
                    else:
                        for _ in range(k):
                            _fire(env, "ITL", name, (now - prev) * 1e3 / k)
                    prev = now
                    tokens += k
                completion = stream.completion
            tokens = completion.num_output_tokens or tokens
            if tokens != self.max_tokens:
                error = RuntimeError(f"expected {self.max_tokens} tokens, got {tokens} "
                                     f"(finish_reason {completion.finish_reason})")
        except Exception as exc:  # noqa: BLE001 - a failure is a locust failure, not a crash
            error = exc
        end = time.perf_counter()
        _fire(env, self.label, name, (end - t0) * 1e3, tokens, error)
        if error is None and first is not None and tokens > 1 and end > first:
            _fire(env, "TOKENS/S", name, (tokens - 1) / (end - first), tokens)


class HttpStreamUser(_StreamUser):
    """POST /v2/models/ensemble/generate_stream (Server-Sent Events) through tritonchat.client."""

    protocol = "http"
    label = "HTTP"


class GrpcStreamUser(_StreamUser):
    """gRPC ModelStreamInfer (decoupled, stream=true) through tritonchat.client / tritonclient."""

    protocol = "grpc"
    label = "gRPC"


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps({"usage": __doc__.splitlines()[2:4]}, indent=2))

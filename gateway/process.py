"""The gateway as a child process (``python -m tritonchat.gateway --config FILE``): what ``tritonchat
serve --openai-port``, ``tritonchat bench --gateway`` and the tests start beside tritonserver, so that
one crashing does not take the other down. Stopped by its pid (SIGTERM, then SIGKILL).

    with GatewayProcess(GatewayConfig(triton_url=srv.grpc_url, metrics_url=srv.metrics_url, port=0)) as gw:
        openai.OpenAI(base_url=gw.base_url + "/v1", api_key="-")
"""

from __future__ import annotations

import atexit
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Dict, Optional

from tritonchat.procs import free_ports, stop_process

from .config import GatewayConfig

__all__ = ["GatewayProcess", "GatewayStartError"]

_RUNNING: "weakref.WeakSet[GatewayProcess]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:  # a gateway must not outlive the Python process that started it
    for gw in list(_RUNNING):
        try:
            gw.stop()
        except Exception:  # noqa: BLE001
            pass


class GatewayStartError(RuntimeError):
    pass


class GatewayProcess:
    """``config.port == 0`` picks a free port. The log (stdout and stderr) goes to ``log_path`` (default: a
    temporary folder removed by :meth:`stop`)."""

    def __init__(self, config: GatewayConfig, log_path: Optional[Path] = None, startup_timeout: float = 60.0,
                 env: Optional[Dict[str, str]] = None):
        self.config = config
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.mkdtemp(prefix="tritonchat-gateway-")
        self.log_path = Path(log_path) if log_path else Path(self._tmp) / "gateway.log"
        self.env = env
        self.process: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "GatewayProcess":
        if self.config.port == 0:
            self.config = self.config.model_copy(update={"port": free_ports(1, self.config.host)[0]})
        cfg_file = Path(self._tmp) / "gateway.json"  # JSON is YAML: load_config reads it
        cfg_file.write_text(json.dumps(self.config.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "tritonchat.gateway", "--config", str(cfg_file)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        _RUNNING.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            rc = self.process.poll()
            if rc is not None:
                raise GatewayStartError(f"the gateway exited with code {rc} while starting:\n{self.log_text()[-3000:]}")
            if self._live():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise GatewayStartError(f"the gateway was not live after {self.startup_timeout:.0f} s:\n"
                                        f"{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def _live(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health/live", timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        proc = self.process
        if proc is None:
            return None
        _RUNNING.discard(self)
        stop_process(proc, ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)))
        # the config file (and the log, unless the caller chose where it goes) go with the process
        import shutil

        shutil.rmtree(self._tmp, ignore_errors=True)
        return proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def scrape(url: str, timeout: float = 5.0) -> Dict[tuple, float]:
    """A Prometheus endpoint's samples: ``(name, ((label, value), ...)) -> value`` (sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    base = url if "://" in url else f"http://{url}"
    if not base.rstrip("/").endswith("/metrics"):
        base = base.rstrip("/") + "/metrics"
    with urllib.request.urlopen(base, timeout=timeout) as r:
        text = r.read().decode("utf-8")
    out: Dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: Dict[tuple, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))

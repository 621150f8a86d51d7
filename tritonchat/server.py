"""Run the real NVIDIA Triton Inference Server (`tritonserver`): as a child process (:class:`TritonServer`,
used by tests, `quickstart` and `bench`) or in the foreground (`tritonchat serve`).

Finding the server and preparing its backend folder and environment: :mod:`tritonchat.install`; reading
its log for the reason it did not start: :mod:`tritonchat.server_log`.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from tritonchat.install import (STUB_NAME, ServerNotFoundError, backend_directory, check_stub, install_backends,
                                locate_server, python_tag, record_server_version, server_env, state_file)
from tritonchat.server_log import failure_reason, is_failure_line

PathLike = Union[str, "os.PathLike[str]"]


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message carries the server's own reason."""

    def __init__(self, message: str, *, reason: str = "", log_path: Optional[Path] = None,
                 returncode: Optional[int] = None):
        super().__init__(message)
        self.reason = reason
        self.log_path = log_path
        self.returncode = returncode


# --------------------------------------------------------------------------------------------- command line


def server_command(repo: PathLike, http_port: int, grpc_port: int, metrics_port: int, log_verbose: int = 0,
                   extra_args: Sequence[str] = (), *, address: Optional[str] = None,
                   backend_dir: Optional[PathLike] = None) -> List[str]:
    """The tritonserver command line for model repository `repo` (nothing is started or installed)."""
    inst = locate_server()
    cmd = [str(inst.binary),
           f"--model-repository={Path(repo).absolute()}",
           f"--backend-directory={Path(backend_dir) if backend_dir else backend_directory(inst)}"]
    if inst.caches is not None:
        cmd.append(f"--cache-directory={inst.caches}")
    cmd += [f"--http-port={int(http_port)}", f"--grpc-port={int(grpc_port)}", f"--metrics-port={int(metrics_port)}"]
    if address:
        cmd += [f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}"]
    cmd += ["--allow-metrics=true", "--exit-on-error=true", "--strict-readiness=true",
            f"--log-verbose={int(log_verbose)}"]
    cmd += [str(a) for a in extra_args]
    return cmd


# --------------------------------------------------------------------------------------------- process


def free_ports(n: int = 3, host: str = "127.0.0.1") -> List[int]:
    """`n` distinct ports that are free on `host` right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http_get(url: str, timeout: float = 2.0) -> Optional[int]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


_RUNNING: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:  # a server must not outlive the Python process that started it
    for server in list(_RUNNING):
        try:
            server.stop(timeout=10)
        except Exception:
            pass


class TritonServer:
    """tritonserver as a child process (context manager).

    >>> with TritonServer("repos/default") as srv:   # free ports on 127.0.0.1, waits for /v2/health/ready
    ...     client = tritonclient.http.InferenceServerClient(srv.http_url)

    A failed start raises :class:`ServerStartError` with the server's reason (e.g. ``failed to load
    'generator' version 1: ...``).
    """

    def __init__(self, model_repository: PathLike, *, http_port: Optional[int] = None,
                 grpc_port: Optional[int] = None, metrics_port: Optional[int] = None, log_verbose: int = 0,
                 extra_args: Sequence[str] = (), host: str = "127.0.0.1", startup_timeout: float = 120.0,
                 log_path: Optional[PathLike] = None, env: Optional[Dict[str, str]] = None):
        self.model_repository = Path(model_repository).absolute()
        self.host = host
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self._own_log_dir: Optional[str] = None
        if log_path is None:
            self._own_log_dir = tempfile.mkdtemp(prefix="tritonchat-server-")
            log_path = Path(self._own_log_dir) / "tritonserver.log"
        self.log_path = Path(log_path)
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self.command: List[str] = []
        self.http_port = self.grpc_port = self.metrics_port = 0

    # urls are host:port, the form tritonclient wants
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TritonServer":
        if not self.model_repository.is_dir():
            raise ServerStartError(f"model repository {self.model_repository} does not exist")
        backend_dir = install_backends()
        auto_ports = not all(self._fixed_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            picked = iter(free_ports(3, self.host))
            self.http_port, self.grpc_port, self.metrics_port = (
                p if p else next(picked) for p in self._fixed_ports)
            self.command = server_command(self.model_repository, self.http_port, self.grpc_port,
                                          self.metrics_port, self.log_verbose, self.extra_args,
                                          address=self.host, backend_dir=backend_dir)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env or server_env(),
                                                start_new_session=True)
            _RUNNING.add(self)
            try:
                self._wait_ready()
                return self
            except ServerStartError as exc:
                port_clash = "Address already in use" in self.log_text() or "ailed to start" in self.log_text()
                self.stop()
                if not (port_clash and attempt + 1 < attempts):
                    raise exc
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            rc = self.process.poll()
            if rc is not None:
                self._raise(f"tritonserver exited with code {rc} while starting", rc)
            if _http_get(url, timeout=1.0) == 200:
                return
            if time.monotonic() > deadline:
                self._raise(f"tritonserver was not ready after {self.startup_timeout:.0f} s", None)
            time.sleep(0.2)

    def _raise(self, what: str, rc: Optional[int]) -> None:
        if rc is None:  # still running: stop it so the log is complete
            self.stop()
        reason = failure_reason(self.log_text())
        raise ServerStartError(f"{what} (repository {self.model_repository}):\n{reason}\n(full log: {self.log_path})",
                               reason=reason, log_path=self.log_path, returncode=rc)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGINT (tritonserver's clean shutdown), then SIGTERM, then SIGKILL; returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        _RUNNING.discard(self)
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        # the stubs are the server's children (same session): make sure none outlives it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def model_ready(self, name: str, version: str = "") -> bool:
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        return _http_get(f"http://{self.http_url}{path}") == 200

    def metadata(self) -> dict:
        with urllib.request.urlopen(f"http://{self.http_url}/v2", timeout=5) as resp:
            return json.load(resp)


# --------------------------------------------------------------------------------------------- set-up


def probe_server_version(timeout: float = 60.0) -> str:
    """Start the server once on an empty repository, read its version from /v2 and record it (for `doctor`)."""
    inst = locate_server()
    with tempfile.TemporaryDirectory(prefix="tritonchat-probe-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        with TritonServer(repo, startup_timeout=timeout, log_path=Path(tmp) / "probe.log") as srv:
            version = str(srv.metadata().get("version", ""))
    record_server_version(inst.binary, version)
    return version


def setup_server(probe: bool = True) -> int:
    """`tritonchat setup-server`: assemble the backend directory (Python stub), check it, and start the server
    once to record its version (unless not `probe`). Returns the exit status (idempotent)."""
    try:
        inst = locate_server()
        print(f"tritonserver: {inst.binary} (from {inst.source})")
        backend_dir = install_backends()
        print(f"backend directory: {backend_dir}")
        problems = check_stub(backend_dir)
        if problems:
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            return 1
        print(f"python backend stub: {backend_dir / 'python' / STUB_NAME} (Python {python_tag()}) ok")
        if probe:
            version = probe_server_version()
            print(f"tritonserver {version} starts and answers (recorded in {state_file()})")
    except (ServerNotFoundError, ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def command_line(repo: PathLike, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_verbose: int = 0) -> str:
    """The shell line that runs tritonserver on `repo` by hand (its PATH and LD_LIBRARY_PATH included)."""
    env = server_env()
    return ("PATH=" + env["PATH"].split(os.pathsep)[0] + ":$PATH "
            + (f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']} " if env.get("LD_LIBRARY_PATH") else "")
            + " ".join(server_command(repo, http_port, grpc_port, metrics_port, log_verbose)))


# --------------------------------------------------------------------------------------------- foreground


def _repo_problem(repo: Path) -> Optional[str]:
    if not repo.exists():
        return f"model repository {repo} does not exist (build one with `tritonchat build --output {repo}`)"
    if not repo.is_dir():
        return f"model repository {repo} is not a folder"
    if not any(repo.glob("*/config.pbtxt")):
        return (f"model repository {repo} has no <model>/config.pbtxt: it is not a Triton model repository "
                f"(build one with `tritonchat build --output {repo}`)")
    return None


def serve_foreground(repo: PathLike, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                     log_verbose: int = 0, extra_args: Sequence[str] = ()) -> int:
    """Run tritonserver in the foreground, passing its output through; Ctrl-C stops it cleanly.

    Returns the server's exit status; on a failed start the reason (failed model loads) is printed.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel

    console = Console(stderr=True)
    repo = Path(repo).absolute()
    problem = _repo_problem(repo)
    if problem:
        console.print(f"[bold red]error:[/] {escape(problem)}", soft_wrap=True)
        return 2
    try:
        backend_dir = install_backends()
        problems = check_stub(backend_dir)
        cmd = server_command(repo, http_port, grpc_port, metrics_port, log_verbose, extra_args,
                             backend_dir=backend_dir)
    except ServerNotFoundError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    for p in problems:
        console.print(f"[yellow]warning:[/] {escape(p)}", soft_wrap=True)
    console.print(f"[dim]$ {escape(' '.join(cmd))}[/]", soft_wrap=True)
    console.print(f"[bold]tritonserver[/] HTTP :{http_port}  gRPC :{grpc_port}  metrics :{metrics_port}  "
                  f"(Ctrl-C to stop)")

    # keep every line that may explain a failure, plus the tail
    tail: collections.deque = collections.deque(maxlen=400)
    important: List[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=server_env(),
                            stdin=subprocess.DEVNULL)

    def pump():
        assert proc.stdout is not None
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        for raw in iter(proc.stdout.readline, b""):
            if out is not None:
                out.write(raw)
                out.flush()
            else:
                sys.stdout.write(raw.decode(errors="replace"))
            line = raw.decode(errors="replace")
            tail.append(line)
            if is_failure_line(line):
                important.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    interrupted = []

    def forward(signum, _frame):
        # a terminal's Ctrl-C reaches the server too (same process group); a second SIGINT is harmless
        interrupted.append(signum)
        if proc.poll() is None:  # tritonserver shuts down cleanly on SIGINT/SIGTERM only
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # only when no handler could be installed (not the main thread)
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reader.join(timeout=5)
    if rc == 0 or (interrupted and rc in (-signal.SIGINT, -signal.SIGTERM, 130, 143)):
        return 0
    reason = failure_reason("".join(important + list(tail)))
    console.print(Panel(escape(reason), title=f"tritonserver exited with code {rc}", border_style="red", expand=False))
    return rc if rc > 0 else 128 - rc


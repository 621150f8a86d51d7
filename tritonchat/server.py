"""Run the real NVIDIA Triton Inference Server (`tritonserver`): as a child process (:class:`TritonServer`,
used by tests, `quickstart` and `bench`) or in the foreground, supervised (`tritonchat serve`).

Finding the server and preparing its backend folder and environment: :mod:`tritonchat.install`; reading
its log for the reason it did not start: :mod:`tritonchat.server_log`; watching and restarting it:
:mod:`tritonchat.supervisor`; API keys: :mod:`tritonchat.security`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from tritonchat.install import (STUB_NAME, ServerNotFoundError, backend_directory, check_stub, install_backends,
                                locate_server, python_tag, record_server_version, server_env, state_file)
from tritonchat.procs import free_ports, http_request, stop_process  # noqa: F401 - free_ports: part of this module's API
from tritonchat.security import Access
from tritonchat.server_log import failure_reason
from tritonchat.supervisor import RestartPolicy, Supervisor

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
    if not any(str(a).startswith("--backend-config=python,thread-pool-size") for a in extra_args):
        cmd.append(f"--backend-config=python,thread-pool-size={python_thread_pool(repo)}")
    cmd += [str(a) for a in extra_args]
    return cmd


def python_thread_pool(repo: PathLike) -> int:
    """Threads the Python backend gets for its models' BLS calls and responses. A stream the entry
    model runs on the generator holds one of them for its whole life, so with the backend's default
    (32) a busy entry starved every other call: client cancellations were seen seconds late (gRPC:
    36 of 100 abandoned streams cancelled, 85 with 512 threads). Enough for every request the entry
    runs at once (its `max_in_flight` in each of its instances) and its pre- and postprocessing calls."""
    cfg = Path(repo) / "ensemble" / "config.pbtxt"
    try:
        text = cfg.read_text()
    except OSError:
        text = ""
    m = re.search(r'key:\s*"max_in_flight",\s*value:\s*\{\s*string_value:\s*"(\d+)"', text)
    count = re.search(r'instance_group\s*\[\s*\{\s*count:\s*(\d+)', text)
    in_flight = (int(m.group(1)) if m else 272) * (int(count.group(1)) if count else 1)
    return max(64, 2 * in_flight + 32)


# --------------------------------------------------------------------------------------------- process


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
            extra = self.extra_args
            if not any(str(a).startswith("--exit-timeout-secs") for a in extra):
                # bounded: after Triton's queue refused a request of a gRPC stream, Triton 2.51 did not
                # unload the entry model at shutdown until the exit timeout (docs/operations.md)
                extra = ("--exit-timeout-secs=10",) + tuple(extra)
            self.command = server_command(self.model_repository, self.http_port, self.grpc_port,
                                          self.metrics_port, self.log_verbose, extra,
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
        # Triton opens its endpoints in turn (gRPC, HTTP, then metrics): HTTP answers ready before the
        # metrics port listens, and on a busy 2-core host a scrape right after "ready" was refused
        urls = [f"http://{self.http_url}/v2/health/ready", f"http://{self.metrics_url}/metrics"]
        while True:
            rc = self.process.poll()
            if rc is not None:
                self._raise(f"tritonserver exited with code {rc} while starting", rc)
            while urls and http_request(urls[0], timeout=1.0)[0] == 200:
                urls.pop(0)
            if not urls:
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
        stop_process(proc, ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)))
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
        return http_request(f"http://{self.http_url}{path}")[0] == 200

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


# `tritonchat serve`: every model loaded at start, more through the repository API later (`tritonchat deploy`)
SERVE_MODEL_CONTROL = ("--model-control-mode=explicit", "--load-model=*")


def serve_args(shutdown_timeout: float = 4.0) -> List[str]:
    """The flags `tritonchat serve` adds to :func:`server_command`: explicit model control with every model
    loaded, and a short wait for requests in flight at shutdown (the supervisor kills what is left at
    `shutdown_timeout`)."""
    return list(SERVE_MODEL_CONTROL) + [f"--exit-timeout-secs={max(1, int(shutdown_timeout) - 2)}"]


def command_line(repo: PathLike, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_verbose: int = 0, *, host: str = "127.0.0.1", access: Optional[Access] = None,
                 shutdown_timeout: float = 4.0) -> str:
    """The shell line that runs tritonserver on `repo` by hand as `tritonchat serve` would (its PATH and
    LD_LIBRARY_PATH included, keys redacted)."""
    access = access or Access()
    env = server_env()
    cmd = server_command(repo, http_port, grpc_port, metrics_port, log_verbose,
                         serve_args(shutdown_timeout) + access.server_args(), address=host)
    return access.redact("PATH=" + env["PATH"].split(os.pathsep)[0] + ":$PATH "
                         + (f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']} " if env.get("LD_LIBRARY_PATH") else "")
                         + " ".join(shlex.quote(c) for c in cmd))


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


def _local_address(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard address means loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _log_to_stderr() -> None:
    logger = logging.getLogger("tritonchat.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s tritonchat serve %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve_foreground(repo: PathLike, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                     log_verbose: int = 0, extra_args: Sequence[str] = (), *, host: str = "127.0.0.1",
                     access: Optional[Access] = None, policy: Optional[RestartPolicy] = None,
                     gateway=None) -> int:
    """`tritonchat serve`: run tritonserver under :class:`~tritonchat.supervisor.Supervisor` (restarts on faults,
    stops within `policy.shutdown_timeout_s` on SIGINT/SIGTERM), passing its output through.

    Returns the exit status: 0 after Ctrl-C / SIGTERM; on a failed first start the reason (failed model
    loads) is printed and the server's status returned; 1 when the supervisor gave up restarting.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel

    console = Console(stderr=True)
    repo = Path(repo).absolute()
    access = access or Access()
    policy = policy or RestartPolicy()
    problem = _repo_problem(repo)
    if problem:
        console.print(f"[bold red]error:[/] {escape(problem)}", soft_wrap=True)
        return 2
    try:
        backend_dir = install_backends()
        problems = check_stub(backend_dir)
        cmd = server_command(repo, http_port, grpc_port, metrics_port, log_verbose,
                             serve_args(policy.shutdown_timeout_s) + access.server_args() + list(extra_args),
                             address=host, backend_dir=backend_dir)
    except ServerNotFoundError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    for p in problems:
        console.print(f"[yellow]warning:[/] {escape(p)}", soft_wrap=True)
    console.print(f"[dim]$ {escape(access.redact(' '.join(shlex.quote(c) for c in cmd)))}[/]", soft_wrap=True)
    console.print(f"[bold]tritonserver[/] on {escape(host)}: HTTP :{http_port}  gRPC :{grpc_port}  "
                  f"metrics :{metrics_port}  (Ctrl-C to stop)")
    console.print(f"[dim]keys: {escape(access.describe())}[/]", soft_wrap=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not access.api_key:
        console.print(f"[yellow]warning:[/] listening on {escape(host)} without --api-key-file: anyone who "
                      "reaches these ports can run inference (metrics carry no key at all)", soft_wrap=True)

    _log_to_stderr()
    local = _local_address(host)
    supervisor = Supervisor(cmd, server_env(), f"{local}:{http_port}", metrics_url=f"{local}:{metrics_port}",
                            policy=policy, redact=access.redact, admin_headers=access.admin_headers("http"))
    gw = None
    if gateway is not None:  # a child process of its own, stopped by pid (its /health/ready follows Triton's)
        from tritonchat.gateway.process import GatewayProcess, GatewayStartError

        try:
            gw = GatewayProcess(gateway, log_path=Path("/dev/stderr")).start()
        except GatewayStartError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            return 2
        console.print(f"[bold]gateway[/] (OpenAI API, playground) on http://{escape(host)}:{gateway.port}/")
    try:
        rc = supervisor.run()
    finally:
        if gw is not None:
            gw.stop()
    if supervisor.failure is not None:
        console.print(Panel(escape(access.redact(supervisor.failure)), title=f"tritonserver did not start (exit {rc})",
                            border_style="red", expand=False))
    return rc

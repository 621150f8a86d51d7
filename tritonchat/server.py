"""Find, prepare and run the real NVIDIA Triton Inference Server (`tritonserver`).

Where the server comes from, in this order:

1. ``$TRITONCHAT_TRITONSERVER`` (path to a ``tritonserver`` binary);
2. a ``tritonserver`` on ``PATH`` or ``/opt/tritonserver/bin/tritonserver`` (the NGC container, which ships
   its own ``backends/`` with python, onnxruntime and tensorrt);
3. the binary shipped inside the ``nvidia-pytriton`` wheel (``pytriton/tritonserver/bin/tritonserver``).

The pytriton wheel ships the Python backend without its stub: one stub per Python version lives in
``pytriton/tritonserver/python_backend_stubs/3.X/``. :func:`install_backends` therefore assembles a private
backend directory, ``<venv>/share/tritonchat/backends/python/``, holding symlinks to ``libtriton_python.so`` and
``triton_python_backend_utils.py`` and a copy of the stub that matches the running interpreter. The wheel's
own files are never modified.

Two things the server's children need from the environment (:func:`server_env`):

* The stub embeds ``libpython3.X`` and takes its ``sys.prefix`` from the first ``python3`` on ``PATH``; with the
  venv's ``bin`` first it imports the venv's packages (numpy, torch, tritonchat ...).
* The wheel's shared objects find their bundled libraries (``nvidia_pytriton.libs``) through an
  ``$ORIGIN``-relative RPATH. That path breaks once the stub is copied and ``libtriton_python.so`` is loaded
  through a symlink elsewhere, so the libs folder goes on ``LD_LIBRARY_PATH`` (as pytriton itself does).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import filecmp
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

ENV_BINARY = "TRITONCHAT_TRITONSERVER"
NGC_ROOT = Path("/opt/tritonserver")
STUB_NAME = "triton_python_backend_stub"
PY_BACKEND_LIB = "libtriton_python.so"
PY_BACKEND_UTILS = "triton_python_backend_utils.py"
STATE_FILE = "tritonserver.json"

PathLike = Union[str, "os.PathLike[str]"]


class ServerNotFoundError(RuntimeError):
    """No usable tritonserver binary or Python backend stub."""


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message carries the server's own reason."""

    def __init__(self, message: str, *, reason: str = "", log_path: Optional[Path] = None,
                 returncode: Optional[int] = None):
        super().__init__(message)
        self.reason = reason
        self.log_path = log_path
        self.returncode = returncode


# --------------------------------------------------------------------------------------------- locating


@dataclass(frozen=True)
class ServerInstall:
    """One tritonserver installation and the folders that come with it."""

    binary: Path
    source: str  # "env" | "path" | "ngc" | "pytriton"
    root: Path  # the folder holding bin/, backends/, caches/
    shipped_backends: Path
    caches: Optional[Path]
    libs: List[Path] = field(default_factory=list)  # bundled shared libraries (pytriton's wheel)
    stubs: Optional[Path] = None  # python_backend_stubs/ (pytriton's wheel)

    @property
    def is_pytriton(self) -> bool:
        return self.stubs is not None


def _pytriton_dist() -> Optional[Path]:
    """pytriton/tritonserver without importing pytriton (its import is slow and logs)."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        dist = Path(loc) / "tritonserver"
        if (dist / "bin" / "tritonserver").is_file():
            return dist
    return None


def _describe(binary: Path, source: str) -> ServerInstall:
    binary = Path(binary).absolute()
    root = binary.parent.parent
    stubs = root / "python_backend_stubs"
    libs: List[Path] = []
    if stubs.is_dir():
        # site-packages/pytriton/tritonserver -> site-packages/nvidia_pytriton.libs (wheel) or
        # pytriton/tritonserver/external_libs (pytriton's own editable install)
        for cand in (root.parent.parent / "nvidia_pytriton.libs", root / "external_libs"):
            if cand.is_dir():
                libs.append(cand)
    caches = root / "caches"
    return ServerInstall(binary=binary, source=source, root=root, shipped_backends=root / "backends",
                         caches=caches if caches.is_dir() else None, libs=libs,
                         stubs=stubs if stubs.is_dir() else None)


def locate_server() -> ServerInstall:
    """Find the tritonserver to use (see the module docstring for the order)."""
    override = os.environ.get(ENV_BINARY)
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            path = path / "bin" / "tritonserver" if (path / "bin").is_dir() else path / "tritonserver"
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerNotFoundError(f"${ENV_BINARY}={override} is not an executable tritonserver")
        return _describe(path, "env")
    on_path = shutil.which("tritonserver")
    if on_path:
        return _describe(Path(on_path).resolve(), "path")
    ngc = NGC_ROOT / "bin" / "tritonserver"
    if ngc.is_file() and os.access(ngc, os.X_OK):
        return _describe(ngc, "ngc")
    dist = _pytriton_dist()
    if dist is not None:
        return _describe(dist / "bin" / "tritonserver", "pytriton")
    raise ServerNotFoundError(
        "no tritonserver found: install the project (./setup.sh, which installs nvidia-pytriton and its "
        f"tritonserver), use the NGC container (/opt/tritonserver), or set ${ENV_BINARY}")


def find_tritonserver() -> Path:
    """Path of the tritonserver binary to run."""
    return locate_server().binary


# --------------------------------------------------------------------------------------------- backends


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def state_dir() -> Path:
    """<venv>/share/tritonchat (or ~/.cache/tritonchat outside a writable prefix)."""
    base = Path(sys.prefix) / "share" / "tritonchat"
    probe = base
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK):
        return base
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tritonchat"


def private_backend_dir() -> Path:
    return state_dir() / "backends"


def private_lib_dir() -> Path:
    """Holds a symlink to this interpreter's libpython when it is not a system library (pyenv, conda)."""
    return state_dir() / "lib"


def _needs_private_backends(inst: ServerInstall) -> bool:
    return not (inst.shipped_backends / "python" / STUB_NAME).is_file() and inst.stubs is not None


def backend_directory(inst: Optional[ServerInstall] = None) -> Path:
    """The folder to pass as --backend-directory (without installing anything)."""
    inst = inst or locate_server()
    return private_backend_dir() if _needs_private_backends(inst) else inst.shipped_backends


def _symlink(target: Path, link: Path) -> bool:
    """Make `link` a symlink to `target`; return True when something changed."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return False
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic, so concurrent installs (parallel test runs) do not trip over each other
    return True


def install_backends() -> Path:
    """Assemble the backend directory and return it (idempotent; the pytriton wheel is never modified).

    For a full server install (NGC container) the shipped ``backends/`` already has the stub and is returned
    as it is. For pytriton's server: ``<venv>/share/tritonchat/backends/python/`` with symlinks to
    ``libtriton_python.so`` and ``triton_python_backend_utils.py`` and a copy of the stub built for this
    Python (``python_backend_stubs/3.X/triton_python_backend_stub``); other shipped backends are symlinked.
    """
    inst = locate_server()
    libpy = interpreter_libpython()
    if libpy is not None:
        private_lib_dir().mkdir(parents=True, exist_ok=True)
        _symlink(libpy.resolve(), private_lib_dir() / libpy.name)
    if not _needs_private_backends(inst):
        if not (inst.shipped_backends / "python" / STUB_NAME).is_file():
            raise ServerNotFoundError(f"{inst.shipped_backends}/python has no {STUB_NAME} and no stubs to copy")
        return inst.shipped_backends
    assert inst.stubs is not None
    stub_src = inst.stubs / python_tag() / STUB_NAME
    if not stub_src.is_file():
        have = sorted(p.name for p in inst.stubs.iterdir() if (p / STUB_NAME).is_file())
        raise ServerNotFoundError(f"the tritonserver at {inst.root} has no Python backend stub for Python "
                                  f"{python_tag()} (it has: {', '.join(have) or 'none'}); use one of those "
                                  "Python versions for the venv")
    src_py = inst.shipped_backends / "python"
    for name in (PY_BACKEND_LIB, PY_BACKEND_UTILS):
        if not (src_py / name).is_file():
            raise ServerNotFoundError(f"{src_py / name} is missing: reinstall nvidia-pytriton")

    dest = private_backend_dir()
    dest_py = dest / "python"
    dest_py.mkdir(parents=True, exist_ok=True)
    for name in (PY_BACKEND_LIB, PY_BACKEND_UTILS):
        _symlink((src_py / name).resolve(), dest_py / name)
    stub_dst = dest_py / STUB_NAME
    if stub_dst.is_symlink() or not (stub_dst.is_file() and filecmp.cmp(stub_src, stub_dst, shallow=False)):
        tmp = dest_py / f".{STUB_NAME}.{os.getpid()}.tmp"
        shutil.copyfile(stub_src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, stub_dst)  # atomic: a running server keeps its old inode
    # any other backend the server ships (none in pytriton 0.7) is linked as a whole
    if inst.shipped_backends.is_dir():
        for entry in inst.shipped_backends.iterdir():
            if entry.name != "python" and entry.is_dir():
                _symlink(entry.resolve(), dest / entry.name)
    return dest


# --------------------------------------------------------------------------------------------- command / env


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


_SYSTEM_LIB_DIRS = {"/lib", "/usr/lib", "/lib64", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                    "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu"}


def interpreter_libpython() -> Optional[Path]:
    """This interpreter's own shared libpython when it is outside the system library folders (pyenv, conda)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or libdir in _SYSTEM_LIB_DIRS:
        return None
    path = Path(libdir) / soname
    return path if path.is_file() else None


def _python_bin_dir() -> Path:
    for cand in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        if (cand / "python3").exists():
            return cand
    return Path(sys.executable).parent


def server_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for tritonserver: the venv's bin first on PATH (the stub's python3), LD_LIBRARY_PATH with the
    pytriton wheel's bundled libs (the copied stub's RPATH no longer reaches them) and this interpreter's
    libpython when it is not a system one. PYTHONPATH is left as it is."""
    env = dict(os.environ if base is None else base)
    bindir = str(_python_bin_dir())
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    env["PATH"] = os.pathsep.join([bindir] + parts)
    extra: List[str] = []
    try:
        inst = locate_server()
        extra += [str(p) for p in inst.libs]
    except ServerNotFoundError:
        pass
    libpy = interpreter_libpython()
    if libpy is not None:
        # only libpython itself (linked by install_backends), not the whole folder: a conda lib/ would shadow
        # system libraries such as libstdc++
        own = private_lib_dir()
        extra.append(str(own if (own / libpy.name).exists() else libpy.parent))
    if extra:
        old = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p not in extra]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(extra + old)
    return env


def missing_libraries(path: Path, env: Optional[Dict[str, str]] = None) -> List[str]:
    """Shared libraries `ldd` cannot resolve for `path` under `env` (empty when ldd is unavailable)."""
    try:
        out = subprocess.run(["ldd", str(path)], env=env if env is not None else server_env(),
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def libpython_package_hint(soname: str) -> str:
    m = re.match(r"libpython(\d+\.\d+)", soname)
    ver = m.group(1) if m else python_tag()
    return f"apt-get install libpython{ver} (Debian/Ubuntu package that provides {soname})"


def check_stub(backend_dir: Optional[Path] = None) -> List[str]:
    """Problems with the Python backend stub (empty list: usable)."""
    problems: List[str] = []
    try:
        backend_dir = backend_dir or backend_directory()
    except ServerNotFoundError as exc:
        return [str(exc)]
    stub = Path(backend_dir) / "python" / STUB_NAME
    if not stub.is_file():
        return [f"{stub} is missing: run ./setup.sh (or python -m tritonchat.server --install)"]
    for lib in missing_libraries(stub):
        if lib.startswith("libpython"):
            problems.append(f"the stub needs {lib}, which is not installed: {libpython_package_hint(lib)}")
        else:
            problems.append(f"the stub needs {lib}, which is not found")
    for lib in missing_libraries(stub.parent / PY_BACKEND_LIB):
        problems.append(f"{PY_BACKEND_LIB} needs {lib}, which is not found")
    built_for = stub_python_version(stub)
    if built_for and built_for != python_tag():
        problems.append(f"the stub is built for Python {built_for} but tritonchat runs on {python_tag()}: the "
                        "models' Python code would not see this environment's packages")
    return problems


def stub_python_version(stub: Path) -> Optional[str]:
    """The X.Y of the libpython the stub links against (read from the binary's dynamic section)."""
    try:
        data = Path(stub).read_bytes()
    except OSError:
        return None
    m = re.search(rb"libpython(\d+\.\d+)\.so", data)
    return m.group(1).decode() if m else None


# --------------------------------------------------------------------------------------------- log reading

_LOG_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\] ")
_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM unable to start",
          "Unable to allocate pinned system memory", "GPU metrics", "CUDA driver version is insufficient")


def _clean(line: str) -> str:
    line = _LOG_PREFIX.sub("", line.strip())
    if len(line) >= 2 and line[0] == '"' and line[-1] == '"':
        line = line[1:-1]
    return line.replace("\\n", "\n").replace('\\"', '"').replace("\\'", "'").strip()


def failure_reason(log_text: str) -> str:
    """The lines of a tritonserver log that say why it did not start (failed model loads first)."""
    lines = log_text.splitlines()
    specific: List[str] = []
    summary: List[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("error: creating server"):
            summary.append(stripped)
        elif ("failed to load '" in stripped or "failed to create model" in stripped
              or "Poll failed for model directory" in stripped):
            text = _clean(stripped)
            if text not in specific:
                specific.append(text)
        elif stripped.startswith("[libprotobuf ERROR"):  # config.pbtxt syntax: "4:17: Expected string, got: X"
            specific.append(stripped.split("] ", 1)[-1])
    if specific:
        # "failed to load 'm'" repeats the detailed "failed to load 'm' version 1: <why>": keep the detailed one
        specific = [f for f in specific if not any(o != f and o.startswith(f) for o in specific)]
        return "\n".join(specific + summary)
    errors: List[str] = []
    for line in lines:
        stripped = line.strip()
        is_err = stripped.startswith("E") and _LOG_PREFIX.match(stripped) is not None
        is_err = is_err or stripped.startswith(("error:", "Error:", "terminate called", "Segmentation fault"))
        is_err = is_err or "UNAVAILABLE:" in stripped or "Address already in use" in stripped
        if is_err and not any(n in stripped for n in _NOISE):
            text = _clean(stripped)
            if text and text not in errors:
                errors.append(text)
    if errors:
        return "\n".join(errors)
    tail = [line for line in lines if line.strip()][-20:]
    return "\n".join(tail) if tail else "(the server wrote no log)"


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


# --------------------------------------------------------------------------------------------- version probe


def _binary_signature(binary: Path) -> dict:
    st = binary.stat()
    return {"binary": str(binary), "size": st.st_size, "mtime": int(st.st_mtime)}


def probe_server_version(timeout: float = 60.0) -> str:
    """Start the server once on an empty repository, read its version from /v2 and record it (for `doctor`)."""
    inst = locate_server()
    with tempfile.TemporaryDirectory(prefix="tritonchat-probe-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        with TritonServer(repo, startup_timeout=timeout, log_path=Path(tmp) / "probe.log") as srv:
            version = str(srv.metadata().get("version", ""))
    record = dict(_binary_signature(inst.binary), version=version, probed_at=int(time.time()))
    path = state_dir() / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return version


def recorded_server_version(binary: Optional[Path] = None) -> Optional[str]:
    """The version recorded by the last probe of this very binary (same path, size and mtime)."""
    try:
        binary = binary or find_tritonserver()
        record = json.loads((state_dir() / STATE_FILE).read_text())
        sig = _binary_signature(binary)
    except (OSError, ValueError, ServerNotFoundError):
        return None
    if all(record.get(k) == v for k, v in sig.items()):
        return record.get("version") or None
    return None


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
            if any(k in line for k in ("failed to load '", "Poll failed", "libprotobuf ERROR", "failed to create")):
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


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonchat.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true",
                        help="assemble the backend directory (Python stub) and record the server version")
    parser.add_argument("--no-probe", action="store_true", help="with --install: do not start the server once")
    parser.add_argument("--print-command", metavar="REPO", help="print the tritonserver command line for REPO")
    args = parser.parse_args(argv)
    if not (args.install or args.print_command):
        parser.print_help()
        return 2
    try:
        inst = locate_server()
        if args.install:
            print(f"tritonserver: {inst.binary} (from {inst.source})")
            backend_dir = install_backends()
            print(f"backend directory: {backend_dir}")
            problems = check_stub(backend_dir)
            if problems:
                for p in problems:
                    print(f"error: {p}", file=sys.stderr)
                return 1
            print(f"python backend stub: {backend_dir / 'python' / STUB_NAME} (Python {python_tag()}) ok")
            if not args.no_probe:
                version = probe_server_version()
                print(f"tritonserver {version} starts and answers (recorded in {state_dir() / STATE_FILE})")
        if args.print_command:
            env = server_env()
            print("PATH=" + env["PATH"].split(os.pathsep)[0] + ":$PATH "
                  + (f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']} " if env.get("LD_LIBRARY_PATH") else "")
                  + " ".join(server_command(args.print_command, 8000, 8001, 8002)))
    except (ServerNotFoundError, ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Find the real NVIDIA Triton Inference Server (`tritonserver`) and prepare what it needs to run
this project's Python models: the backend folder with a Python stub, and the environment.

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

Starting and stopping the server: :mod:`tritonchat.server`. ``tritonchat setup-server`` runs all of this once.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ENV_BINARY = "TRITONCHAT_TRITONSERVER"
NGC_ROOT = Path("/opt/tritonserver")
STUB_NAME = "triton_python_backend_stub"
PY_BACKEND_LIB = "libtriton_python.so"
PY_BACKEND_UTILS = "triton_python_backend_utils.py"
STATE_FILE = "tritonserver.json"


class ServerNotFoundError(RuntimeError):
    """No usable tritonserver binary or Python backend stub."""


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


# --------------------------------------------------------------------------------------------- backends


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def state_dir() -> Path:
    """<venv>/share/tritonchat (or ~/.cache/tritonchat outside a writable prefix)."""
    base = Path(sys.prefix) / "share" / "tritonchat"
    if (base / "backends").is_dir():  # assembled by setup-server: used as is, even read-only (an image)
        return base
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


# --------------------------------------------------------------------------------------------- environment


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


def python_bin_dir() -> Path:
    """The folder whose python3 the stub runs (first on the server's PATH)."""
    for cand in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        if (cand / "python3").exists():
            return cand
    return Path(sys.executable).parent


def server_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for tritonserver: the venv's bin first on PATH (the stub's python3), LD_LIBRARY_PATH with the
    pytriton wheel's bundled libs (the copied stub's RPATH no longer reaches them) and this interpreter's
    libpython when it is not a system one. PYTHONPATH is left as it is."""
    env = dict(os.environ if base is None else base)
    bindir = str(python_bin_dir())
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
        return [f"{stub} is missing: run ./setup.sh (or tritonchat setup-server)"]
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


# --------------------------------------------------------------------------------------------- version record


def _binary_signature(binary: Path) -> dict:
    st = binary.stat()
    return {"binary": str(binary), "size": st.st_size, "mtime": int(st.st_mtime)}


def state_file() -> Path:
    """Where `tritonchat setup-server` records the version of the server it started once."""
    return state_dir() / STATE_FILE


def record_server_version(binary: Path, version: str) -> Path:
    """Record `version` for this very binary (its path, size and mtime); return the record's path."""
    record = dict(_binary_signature(binary), version=version, probed_at=int(time.time()))
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def recorded_server_version(binary: Optional[Path] = None) -> Optional[str]:
    """The version recorded by the last probe of this very binary (same path, size and mtime)."""
    try:
        binary = binary or locate_server().binary
        record = json.loads(state_file().read_text())
        sig = _binary_signature(binary)
    except (OSError, ValueError, ServerNotFoundError):
        return None
    if all(record.get(k) == v for k, v in sig.items()):
        return record.get("version") or None
    return None

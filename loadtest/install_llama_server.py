"""Build llama.cpp's own server, ``llama-server``, into ``<repo>/.tools/bin/`` (git-ignored): the CPU peer
of ``tritonchat bench --peers llama.cpp`` (continuous batching, ``-np C`` sequences at once).

    tritonchat install-llama-server [--force] [--version 0.3.36] [--sdist FILE] [--jobs N]

What it does (idempotent: a build of the same version is left alone):

1. The llama-cpp-python source distribution from PyPI (``--sdist FILE``: one already downloaded), found
   through PyPI's simple index (JSON, PEP 691) and checked against the sha256 the index gives. It
   vendors llama.cpp (``vendor/llama.cpp``) at the commit that release was made with.
2. CMake + Ninja (or Make) in ``.tools/llama.cpp/build``: Release, CPU only, ``GGML_NATIVE`` (this
   machine's vector extensions), no libcurl, static libraries; the targets ``llama-server`` and
   ``llama-quantize`` (for the q8_0 file an INT8 repository is compared with). A few minutes on 2 cores.
3. ``.tools/bin/llama-server`` and ``.tools/bin/llama-quantize``; ``.tools/llama.cpp/install.json`` records
   the version. The gguf Python package of the same tree (``gguf-py``) stays beside it for the
   HF -> GGUF conversion (loadtest/gguf_convert.py) where ``gguf`` is not installed.

Exit status: 0 built (or already there), 1 failed (the reason is printed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path
from typing import Optional

from .install_perf_analyzer import repo_root, tools_dir

DEFAULT_VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
INDEX = "https://pypi.org/simple/"
TARGETS = ("llama-server", "llama-quantize")
STAMP = "install.json"


class InstallError(RuntimeError):
    pass


def home(root: Optional[Path] = None) -> Path:
    return tools_dir(root) / "llama.cpp"


def find_llama_server() -> Optional[Path]:
    """``$TRITONCHAT_LLAMA_SERVER``, else ``<repo>/.tools/bin/llama-server``, else ``llama-server`` on PATH."""
    env = os.environ.get("TRITONCHAT_LLAMA_SERVER")
    if env:
        return Path(env) if Path(env).is_file() else None
    built = tools_dir() / "bin" / "llama-server"
    if built.is_file():
        return built
    found = shutil.which("llama-server")
    return Path(found) if found else None


def gguf_py_dir(root: Optional[Path] = None) -> Optional[Path]:
    """The vendored gguf Python package of the build (for conversion where ``gguf`` is not installed)."""
    for cand in sorted(home(root).glob("src/*/vendor/llama.cpp/gguf-py")):
        if (cand / "gguf").is_dir():
            return cand
    return None


def sdist_url(version: str, index: str = INDEX) -> tuple[str, str, str]:
    """(filename, url, sha256) of the package's sdist of `version`, from the simple index's JSON form."""
    req = urllib.request.Request(f"{index.rstrip('/')}/{PACKAGE}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        data = json.load(r)
    want = f"{PACKAGE.replace('-', '_')}-{version}.tar.gz"
    for f in data.get("files", []):
        if f.get("filename") == want:
            return want, f["url"], f.get("hashes", {}).get("sha256", "")
    raise InstallError(f"{want} is not on {index} (versions: see {index}{PACKAGE}/)")


def _download(url: str, dest: Path, sha256: str) -> Path:
    tmp = dest.with_suffix(".part")
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as out:
        while True:
            block = r.read(1 << 20)
            if not block:
                break
            h.update(block)
            out.write(block)
    if sha256 and h.hexdigest() != sha256:
        tmp.unlink()
        raise InstallError(f"{dest.name}: sha256 {h.hexdigest()} is not the index's {sha256}")
    tmp.replace(dest)
    return dest


def _extract(sdist: Path, into: Path) -> Path:
    """The sdist's ``vendor/llama.cpp`` (only that part is unpacked)."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name or m.name.endswith("/vendor/llama.cpp")]
        if not members:
            raise InstallError(f"{sdist.name} has no vendor/llama.cpp")
        tar.extractall(into, members=members, filter="data")
    found = sorted(into.glob("*/vendor/llama.cpp"))
    if not found:
        raise InstallError(f"{sdist.name}: vendor/llama.cpp did not unpack")
    return found[0]


def install(version: str = DEFAULT_VERSION, force: bool = False, root: Optional[Path] = None,
            sdist: Optional[Path] = None, jobs: int = 0, log=print) -> Path:
    base = home(root)
    bin_dir = tools_dir(root) / "bin"
    stamp = base / STAMP
    if not force and stamp.is_file() and all((bin_dir / t).is_file() for t in TARGETS):
        if json.loads(stamp.read_text()).get("version") == version:
            log(f"llama-server {version} is already built: {bin_dir / 'llama-server'}")
            return bin_dir / "llama-server"
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise InstallError(f"{tool} is not installed (Debian: apt-get install cmake g++)")
    base.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        name, url, sha = sdist_url(version)
        sdist = base / name
        if not sdist.is_file():
            log(f"downloading {url}")
            _download(url, sdist, sha)
    src_root = base / "src"
    shutil.rmtree(src_root, ignore_errors=True)
    src = _extract(Path(sdist), src_root)
    build = base / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = ["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
           "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
           "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"]
    jobs = jobs or os.cpu_count() or 2
    for cmd in (cfg, ["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)]):
        log("$ " + " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise InstallError(f"{cmd[0]} {cmd[1]} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for t in TARGETS:
        shutil.copy2(build / "bin" / t, bin_dir / t)
    stamp.write_text(json.dumps({"version": version, "sdist": Path(sdist).name, "source": str(src)}, indent=1))
    log(f"built {bin_dir / 'llama-server'} (llama.cpp from {PACKAGE} {version})")
    return bin_dir / "llama-server"


def run_install(version: str, force: bool, root: Optional[Path], sdist: Optional[Path], jobs: int) -> int:
    try:
        install(version, force, root or repo_root(), sdist, jobs)
    except (InstallError, OSError) as exc:
        print(f"install-llama-server failed: {exc}")
        return 1
    return 0

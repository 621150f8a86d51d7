"""Install NVIDIA's ``perf_analyzer`` into ``<repo>/.tools/`` (git-ignored), for any glibc, and find it.

    tritonchat install-perf-analyzer [--force] [--version 2.60.0]

What it does (idempotent: a working install with the same version is left alone):

1. ``pip download --only-binary=:all: --platform manylinux_2_38_x86_64 --no-deps perf-analyzer==V`` and
   unzip the wheel into ``.tools/perf_analyzer/`` (the wheel is only a binary, ``perf_analyzer/bin/perf_analyzer``,
   plus a tiny Python launcher; it is *not* pip-installed into the venv).
2. The binary needs glibc >= 2.38 and GLIBCXX_3.4.32. Where the system glibc is that new (Ubuntu 24.04,
   the GPU machines) the wrapper runs it directly. Otherwise (Debian 12: glibc 2.36) Debian trixie's
   ``libc6``, ``libstdc++6`` and ``libgcc-s1`` (plus whatever ``ld.so --list`` still reports missing) are
   fetched with ``apt-get download`` through a *private* apt configuration (its own sources list, lists
   and cache under ``.tools/cache/apt``: the system's apt state is not touched) and unpacked with
   ``dpkg -x`` into ``.tools/glibc/``; the wrapper starts the binary through that glibc's own loader:
   ``.tools/glibc/lib64/ld-linux-x86-64.so.2 --library-path <glibc libs>:<wheel libs> <binary> "$@"``.
3. ``.tools/bin/perf_analyzer``: that wrapper (a relocatable shell script); ``tritonchat doctor`` finds it.

The PyPI distribution ``perf_analyzer 0.1.0`` some environments carry is an unrelated placeholder (no
binary); it does not shadow anything here (the wrapper is a file under ``.tools/``, not a module).

Exit status: 0 installed (or already there), 1 failed (the reason is printed; ``./setup.sh`` only warns).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

DEFAULT_VERSION = "2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
NEEDS_GLIBC = (2, 38)
DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
# soname -> the trixie package that ships it (for what `ld.so --list` still reports missing)
SONAME_PACKAGES = {
    "libz.so.1": "zlib1g",
    "libssl.so.3": "libssl3t64",
    "libcrypto.so.3": "libssl3t64",
    "libgcc_s.so.1": "libgcc-s1",
    "libstdc++.so.6": "libstdc++6",
}
STAMP = "install.json"


class InstallError(RuntimeError):
    pass


def repo_root() -> Path:
    """The project checkout (editable install), else the current directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def tools_dir(root: Optional[Path] = None) -> Path:
    return (root or repo_root()) / ".tools"


def wrapper_path(root: Optional[Path] = None) -> Path:
    return tools_dir(root) / "bin" / "perf_analyzer"


def find_perf_analyzer() -> Optional[Path]:
    """perf_analyzer on PATH, else one under ``<repo>/.tools/`` (what this module installs)."""
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    tools = tools_dir()
    if tools.is_dir():
        for cand in sorted(tools.rglob("perf_analyzer")):
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
    return None


def system_glibc() -> Tuple[int, int]:
    """(major, minor) of the running glibc; (0, 0) where it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        if name == "glibc":
            major, minor = version.split(".")[:2]
            return int(major), int(minor)
    except (ValueError, OSError, AttributeError):
        pass
    libc, version = platform.libc_ver()
    if libc == "glibc" and version:
        parts = version.split(".")
        return int(parts[0]), int(parts[1])
    return 0, 0


def _say(msg: str) -> None:
    print(f"[perf_analyzer] {msg}", flush=True)


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kw)


def probe(wrapper: Path, timeout: float = 30.0) -> Tuple[bool, str]:
    """(works, first line of `perf_analyzer --version`)."""
    if not wrapper.is_file() or not os.access(wrapper, os.X_OK):
        return False, f"{wrapper} does not exist"
    try:
        res = _run([wrapper, "--version"], timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    out = (res.stdout + res.stderr).strip()
    if "Perf Analyzer Version" in out:
        return True, out.splitlines()[0]
    return False, out.splitlines()[-1] if out else f"exit code {res.returncode}"


# ---------------------------------------------------------------------------------------------- steps


def fetch_wheel(version: str, tools: Path) -> Path:
    """Download the wheel (once) and unzip it into .tools/perf_analyzer/; returns the binary."""
    cache = tools / "cache" / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"perf_analyzer-{version}-*{WHEEL_PLATFORM}.whl"
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        _say(f"pip download perf-analyzer=={version} ({WHEEL_PLATFORM} wheel)")
        res = _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                    "--platform", WHEEL_PLATFORM, "--no-deps", "--dest", cache, f"perf-analyzer=={version}"])
        if res.returncode != 0:
            raise InstallError(f"pip download perf-analyzer=={version} failed: {(res.stderr or res.stdout).strip()[-600:]}")
        wheels = sorted(cache.glob(pattern))
        if not wheels:
            raise InstallError(f"pip download succeeded but no {pattern} in {cache}")
    dest = tools / "perf_analyzer"
    if dest.exists():
        shutil.rmtree(dest)
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extractall(dest)
    binary = dest / "perf_analyzer" / "bin" / "perf_analyzer"
    if not binary.is_file():
        found = [p for p in dest.rglob("perf_analyzer") if p.is_file()]
        if not found:
            raise InstallError(f"{wheels[-1].name} holds no perf_analyzer binary")
        binary = found[0]
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def wheel_library_dirs(wheel_root: Path) -> List[Path]:
    """Folders of the unzipped wheel that hold shared libraries (none in 2.60.0; kept general)."""
    dirs = sorted({p.parent for p in wheel_root.rglob("*.so*") if p.is_file()})
    return dirs


def _apt_options(apt_dir: Path) -> List[str]:
    lists, cache = apt_dir / "lists", apt_dir / "cache"
    for d in (lists / "partial", cache / "archives" / "partial", apt_dir / "sources.list.d",
              apt_dir / "preferences.d"):
        d.mkdir(parents=True, exist_ok=True)
    sources = apt_dir / "sources.list"
    sources.write_text(f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    opts = {
        "Dir::Etc::SourceList": sources, "Dir::Etc::SourceParts": apt_dir / "sources.list.d",
        "Dir::Etc::Preferences": apt_dir / "preferences", "Dir::Etc::PreferencesParts": apt_dir / "preferences.d",
        "Dir::State::Lists": lists, "Dir::Cache": cache, "APT::Get::List-Cleanup": "0",
        "Debug::NoLocking": "1",  # private lists/cache: the system's apt lock is not ours to take
    }
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        opts["APT::Sandbox::User"] = "root"  # the _apt user cannot write into .tools/
    out: List[str] = []
    for key, value in opts.items():
        out += ["-o", f"{key}={value}"]
    return out


def apt_download(packages: Sequence[str], apt_dir: Path, debs: Path) -> List[Path]:
    """`apt-get download` the packages from Debian trixie with a private apt configuration."""
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise InstallError("apt-get/dpkg not found: cannot fetch a newer glibc (this path needs a Debian-like system)")
    opts = _apt_options(apt_dir)
    lists = apt_dir / "lists"
    if not any(lists.glob("*Packages*")):
        _say(f"apt-get update (private lists for Debian {DEBIAN_SUITE}, in {apt_dir})")
        res = _run(["apt-get", *opts, "-q", "update"], timeout=600)
        if res.returncode != 0 or not any(lists.glob("*Packages*")):
            raise InstallError(f"apt-get update for {DEBIAN_SUITE} failed: {(res.stderr or res.stdout).strip()[-600:]}")
    debs.mkdir(parents=True, exist_ok=True)
    wanted = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if wanted:
        _say(f"apt-get download {' '.join(wanted)} ({DEBIAN_SUITE})")
        res = _run(["apt-get", *opts, "-q", "download", *wanted], cwd=debs, timeout=600)
        if res.returncode != 0:
            raise InstallError(f"apt-get download {' '.join(wanted)} failed: {(res.stderr or res.stdout).strip()[-600:]}")
    return [next(iter(sorted(debs.glob(f"{p}_*.deb")))) for p in packages]


def unpack(debs: Sequence[Path], glibc: Path) -> None:
    glibc.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        res = _run(["dpkg", "-x", deb, glibc])
        if res.returncode != 0:
            raise InstallError(f"dpkg -x {deb.name} failed: {res.stderr.strip()}")
    # trixie is merged-/usr: expose lib64/ (the loader) and lib/ at the top as well
    for name in ("lib64", "lib"):
        top, usr = glibc / name, glibc / "usr" / name
        if usr.is_dir() and not top.exists():
            top.symlink_to(Path("usr") / name)


def glibc_library_dirs(glibc: Path) -> List[Path]:
    dirs = [glibc / "usr" / "lib" / "x86_64-linux-gnu", glibc / "lib" / "x86_64-linux-gnu"]
    return [d for d in dirs if d.is_dir()][:1]


def loader(glibc: Path) -> Path:
    for cand in (glibc / "lib64" / "ld-linux-x86-64.so.2", glibc / "usr" / "lib64" / "ld-linux-x86-64.so.2",
                 glibc / "usr" / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2"):
        if cand.exists():
            return cand
    raise InstallError(f"no ld-linux-x86-64.so.2 under {glibc}")


def missing_sonames(ld: Path, lib_path: str, binary: Path) -> List[str]:
    res = _run([ld, "--library-path", lib_path, "--list", binary])
    text = res.stdout + res.stderr
    return sorted({line.split("=>")[0].strip() for line in text.splitlines() if "not found" in line})


def write_wrapper(wrapper: Path, tools: Path, binary: Path, ld: Optional[Path], lib_dirs: Sequence[Path]) -> None:
    """A relocatable shell script: paths are relative to .tools/ (the wrapper's ../)."""
    def rel(p: Path) -> str:
        return '"$T"/' + str(Path(os.path.relpath(p, tools)))

    lines = ["#!/bin/sh", "# perf_analyzer wrapper written by tritonchat install-perf-analyzer",
             'T="$(cd "$(dirname "$0")/.." && pwd)"']
    if ld is not None:
        libs = ":".join(rel(d) for d in lib_dirs)
        lines += [f"# runs the manylinux_2_38 binary through Debian {DEBIAN_SUITE}'s glibc loader",
                  f"exec {rel(ld)} --library-path {libs} {rel(binary)} \"$@\""]
    else:
        if lib_dirs:
            libs = ":".join(rel(d) for d in lib_dirs)
            lines.append(f'LD_LIBRARY_PATH={libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}; export LD_LIBRARY_PATH')
        lines.append(f"exec {rel(binary)} \"$@\"")
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    tmp = wrapper.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o755)
    tmp.replace(wrapper)


def install(version: str = DEFAULT_VERSION, force: bool = False, root: Optional[Path] = None) -> Path:
    tools = tools_dir(root)
    wrapper = wrapper_path(root)
    stamp = tools / "perf_analyzer" / STAMP
    if not force and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except ValueError:
            recorded = {}
        works, line = probe(wrapper)
        if works and recorded.get("version") == version:
            _say(f"already installed: {wrapper} ({line}, wheel {version}, {recorded.get('mode')})")
            return wrapper
    if platform.machine() not in ("x86_64", "AMD64"):
        raise InstallError(f"the perf-analyzer wheel is x86_64 only; this machine is {platform.machine()}")
    tools.mkdir(parents=True, exist_ok=True)
    binary = fetch_wheel(version, tools)
    wheel_libs = wheel_library_dirs(tools / "perf_analyzer")
    have = system_glibc()
    if have >= NEEDS_GLIBC:
        mode = f"system glibc {have[0]}.{have[1]}"
        write_wrapper(wrapper, tools, binary, None, wheel_libs)
    else:
        mode = f"Debian {DEBIAN_SUITE} glibc loader (system glibc {have[0]}.{have[1]} < 2.38)"
        apt_dir, debs, glibc = tools / "cache" / "apt", tools / "cache" / "debs", tools / "glibc"
        packages = list(BASE_PACKAGES)
        if glibc.exists():
            shutil.rmtree(glibc)
        unpack(apt_download(packages, apt_dir, debs), glibc)
        ld = loader(glibc)
        lib_dirs = glibc_library_dirs(glibc) + wheel_libs
        lib_path = ":".join(map(str, lib_dirs))
        missing = missing_sonames(ld, lib_path, binary)
        extra = sorted({SONAME_PACKAGES[s] for s in missing if s in SONAME_PACKAGES} - set(packages))
        if extra:
            _say(f"still missing {', '.join(missing)}: fetching {', '.join(extra)}")
            unpack(apt_download(extra, apt_dir, debs), glibc)
            missing = missing_sonames(ld, lib_path, binary)
        if missing:
            raise InstallError(f"libraries still not found for {binary.name}: {', '.join(missing)}")
        write_wrapper(wrapper, tools, binary, ld, lib_dirs)
    works, line = probe(wrapper)
    if not works:
        raise InstallError(f"{wrapper} does not run: {line}")
    stamp.write_text(json.dumps({"version": version, "mode": mode, "binary": str(binary)}, indent=2))
    _say(f"installed {wrapper} ({line}; {mode})")
    return wrapper


def run_install(version: str = DEFAULT_VERSION, force: bool = False, root: Optional[Path] = None) -> int:
    """`tritonchat install-perf-analyzer`: the exit status (the reason of a failure is printed)."""
    try:
        install(version, force, root)
    except (InstallError, OSError, subprocess.SubprocessError, zipfile.BadZipFile) as exc:
        print(f"[perf_analyzer] not installed: {exc}", file=sys.stderr)
        return 1
    return 0

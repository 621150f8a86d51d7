"""`tritonchat doctor`: what is installed, and whether the server can run models.

Nothing is started. The server version comes from, in this order: ``$TRITON_SERVER_VERSION`` /
``$TRITONSERVER_VERSION`` (the NGC container sets the first), the version recorded when ``./setup.sh`` started
this very binary once (``tritonchat setup-server``), or pytriton's known pairing; this
tritonserver has no ``--version`` flag and its binaries do not carry the version as a plain string.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional, Tuple

# pytriton release -> the tritonserver its wheel ships (checked by starting it: GET /v2 -> version)
PYTRITON_SERVER = {"0.7.0": "2.51.0"}

OK, WARN, BAD = "[green]ok[/]", "[yellow]warn[/]", "[red]missing[/]"


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def server_version(binary: Path, source: str) -> Tuple[str, str]:
    """(version, where it came from) without starting anything."""
    from tritonchat import install

    if source != "pytriton":
        for var in ("TRITON_SERVER_VERSION", "TRITONSERVER_VERSION"):
            if os.environ.get(var):
                ngc = os.environ.get("NVIDIA_TRITON_SERVER_VERSION")
                return os.environ[var] + (f" (NGC {ngc})" if ngc else ""), f"${var}"
    recorded = install.recorded_server_version(binary)
    if recorded:
        return recorded, "recorded by ./setup.sh (server started once)"
    if source == "pytriton":
        pv = _version("nvidia-pytriton")
        if pv in PYTRITON_SERVER:
            return PYTRITON_SERVER[pv], f"nvidia-pytriton {pv} ships it"
        return "unknown", f"nvidia-pytriton {pv}: run ./setup.sh to record it"
    return "unknown", "run tritonchat setup-server to record it"


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:160]


def run_doctor() -> int:
    from rich.console import Console
    from rich.table import Table

    from tritonchat import install
    from tritonchat.loadtest.install_perf_analyzer import find_perf_analyzer

    console = Console()
    table = Table(title="tritonchat doctor", show_lines=False)
    table.add_column("check")
    table.add_column("", justify="center")
    table.add_column("details", overflow="fold")
    fixes: List[str] = []
    usable = True

    table.add_row("Python", OK, f"{platform.python_version()} ({sys.executable})")
    table.add_row("tritonchat", OK, f"{_version('tritonchat') or '?'} ({Path(__file__).resolve().parent})")

    # --- server
    inst = None
    try:
        inst = install.locate_server()
    except install.ServerNotFoundError as exc:
        usable = False
        table.add_row("tritonserver", BAD, str(exc))
        fixes.append(f"unset or correct ${install.ENV_BINARY}" if os.environ.get(install.ENV_BINARY)
                     else "run ./setup.sh (installs nvidia-pytriton, which ships tritonserver)")
    if inst is not None:
        missing = install.missing_libraries(inst.binary)
        version, origin = server_version(inst.binary, inst.source)
        status = OK if not missing else BAD
        detail = f"{version} [dim]({origin})[/]\n{inst.binary} [dim](from {inst.source})[/]"
        if missing:
            usable = False
            detail += f"\n[red]unresolved libraries: {', '.join(missing)}[/]"
            fixes.append("reinstall the server (./setup.sh) so its bundled libraries are found")
        table.add_row("tritonserver", status, detail)

        backend_dir = install.backend_directory(inst)
        names = sorted(p.name for p in backend_dir.iterdir() if p.is_dir()) if backend_dir.is_dir() else []
        wanted = ("python", "onnxruntime", "tensorrt")
        marks = "  ".join(f"{n} {'[green]yes[/]' if n in names else '[dim]no[/]'}" for n in wanted)
        others = [n for n in names if n not in wanted]
        table.add_row("backends", OK if "python" in names else BAD,
                      f"{marks}{'  others: ' + ', '.join(others) if others else ''}\n{backend_dir}")

        stub = backend_dir / "python" / install.STUB_NAME
        problems = install.check_stub(backend_dir)
        if problems:
            usable = False
            table.add_row("python stub", BAD, "\n".join(problems))
            fixes.append("run ./setup.sh (tritonchat setup-server copies the stub for "
                         f"Python {install.python_tag()})")
        else:
            built = install.stub_python_version(stub) or "?"
            table.add_row("python stub", OK, f"built for Python {built}, matches this Python\n{stub}")
        table.add_row("stub's python3", OK, f"{install.python_bin_dir() / 'python3'} (first on PATH for the server)")
        if inst.caches is not None:
            table.add_row("response cache", OK, str(inst.caches))

    pa = find_perf_analyzer()
    table.add_row("perf_analyzer", OK if pa else WARN,
                  str(pa) if pa else "not found (on PATH or under .tools/): only needed for `perf_analyzer` runs")

    # --- Python-side runtimes
    try:
        import onnxruntime as ort

        table.add_row("onnxruntime", OK, f"{ort.__version__}; providers: {', '.join(ort.get_available_providers())}")
    except Exception as exc:  # noqa: BLE001 - report anything
        table.add_row("onnxruntime", BAD, _first_line(exc))
    try:
        import torch

        if torch.cuda.is_available():
            gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            table.add_row("torch", OK, f"{torch.__version__}; CUDA {torch.version.cuda}: {gpus}")
        else:
            why = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no GPU visible"
            table.add_row("torch", OK, f"{torch.__version__}; CUDA not available ({why})")
    except Exception as exc:  # noqa: BLE001
        table.add_row("torch", BAD, _first_line(exc))
    try:
        trt = importlib.import_module("tensorrt")
        table.add_row("tensorrt", OK, str(getattr(trt, "__version__", "?")))
    except Exception as exc:  # noqa: BLE001
        table.add_row("tensorrt", WARN, f"not importable: {_first_line(exc)}")
    tc = _version("tritonclient")
    table.add_row("tritonclient", OK if tc else BAD, tc or "not installed")
    if not tc:
        fixes.append("run ./setup.sh (installs tritonclient[http,grpc])")

    console.print(table)
    if usable:
        console.print("[green]The server and the Python backend stub are usable.[/]")
        return 0
    console.print("[bold red]The server cannot run the models yet.[/] Fix: " + "; ".join(dict.fromkeys(fixes)))
    return 1

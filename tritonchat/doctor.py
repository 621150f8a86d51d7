"""`tritonchat doctor`: what is installed, and whether the server can run models; with `--url`, the
checklist for a 503 against a running deployment (:func:`run_doctor_url`), a fix per failure.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tritonchat.procs import http_request

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


# ------------------------------------------------------------------------------------------------------------
# `tritonchat doctor --url`: the checklist for a 503, against a running deployment


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str
    fix: str = ""


@dataclass
class Target:
    """Where the deployment answers, and the keys it wants (`tritonchat serve --api-key-file/--admin-key-file`)."""

    url: str  # Triton's HTTP host:port
    metrics_url: Optional[str] = None
    gateway_url: Optional[str] = None
    model: str = "ensemble"
    api_key: Optional[str] = None
    admin_key: Optional[str] = None
    repo: Optional[Path] = None  # the model repository on this machine (disk check)

    def headers(self, admin: bool = False) -> Dict[str, str]:
        from tritonchat.security import key_headers

        return key_headers("http", api_key=self.api_key, admin_key=self.admin_key if admin else None)


# Docker's default /dev/shm is 64 MB; each Python stub maps its own region in it (and grows it with tensors)
SHM_MIN_TOTAL, SHM_MIN_FREE = 256 << 20, 64 << 20
DISK_MIN_FREE = 256 << 20


def _request(url: str, *, data: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
             timeout: float = 10.0) -> Tuple[Optional[int], str]:
    """(HTTP status or None when nothing answered, body or the connection error)."""
    status, body = http_request(url if "://" in url else f"http://{url}", data=data, timeout=timeout,
                                headers={"Content-Type": "application/json", **(headers or {})})
    return status, body.decode("utf-8", "replace")


def _load_fix(reason: str) -> str:
    """A fix for a model that did not load, from Triton's reason."""
    low = reason.lower()
    if "manifest" in low:
        return ("the repository's files do not match its manifest.json: rebuild it with `tritonchat build`, or "
                "remove a half-copied version folder (`tritonchat deploy` stages whole folders)")
    if "out of memory" in low or "oom" in low or "cannot allocate" in low:
        return "not enough memory: lower max_batch_size or max_seq_len in the build config, or give it more memory"
    if "no module named" in low:
        return "the models' Python lacks a package: rebuild the image, or re-run ./setup.sh"
    if "stub" in low or "shared memory" in low or "shm" in low:
        return "the Python backend stub failed: give /dev/shm room (--shm-size=1g; emptyDir medium: Memory)"
    if "unload" in low:
        return ("it is being or was unloaded: load it again (`tritonchat deploy --version N`) or restart "
                "`tritonchat serve`")
    if "is not ready" in low:
        return "a model it calls is not loaded: the model rows above say which and why"
    if "permission denied" in low:
        return ("the server cannot read the repository: its files must be readable by the server's user "
                "(uid 10001 in the image): chmod -R a+rX REPO")
    return "read the server's log for the whole reason (`tritonchat serve` prints it; docker logs / kubectl logs)"


def _metric_values(text: str, name: str) -> List[float]:
    out = []
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            try:
                out.append(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return out


def check_deployment(t: Target) -> List[Check]:
    """Walk the 503 checklist: reachable, ready, each model ready, an answer (the stubs), overload, metrics,
    GPU and driver / CUDA / torch, shared memory and disk, the gateway."""
    checks: List[Check] = []
    base = t.url if "://" in t.url else f"http://{t.url}"
    status, body = _request(f"{base}/v2/health/live", timeout=5)
    if status != 200:
        checks.append(Check("server reachable", "fail", f"{base}/v2/health/live: {status or body}",
                            "start it (`tritonchat serve`; docker ps / kubectl get pods); check the port, and that "
                            "it listens where you call it (serve binds 127.0.0.1 unless --host 0.0.0.0; a "
                            "NetworkPolicy admits only the gateway and the monitoring namespace)"))
        checks.append(Check("models, inference, metrics", "skip", "the server does not answer"))
        return checks + _local_checks(t)
    _, meta = _request(f"{base}/v2", headers=t.headers())
    version = _json(meta).get("version", "?")
    checks.append(Check("server reachable", "ok", f"tritonserver {version} at {base}"))

    status, _ = _request(f"{base}/v2/health/ready", timeout=5)
    checks.append(Check("server ready", "ok" if status == 200 else "fail",
                        "every model loaded" if status == 200 else f"/v2/health/ready answers {status}",
                        "" if status == 200 else "a model is not ready: the rows below say which and why"))
    checks += _model_checks(t, base)
    checks.append(_inference_check(t, base))
    checks += _metrics_checks(t)
    checks += _local_checks(t)
    if t.gateway_url:
        gw = t.gateway_url if "://" in t.gateway_url else f"http://{t.gateway_url}"
        status, body = _request(f"{gw}/health/ready", timeout=5)
        checks.append(Check("gateway ready", "ok" if status == 200 else "fail", f"{gw}/health/ready: {status or body}",
                            "" if status == 200 else "start `tritonchat gateway` (or serve --openai-port); its "
                            "--triton-url must reach Triton's gRPC port"))
    return checks


def _json(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return {}


def _model_checks(t: Target, base: str) -> List[Check]:
    status, body = _request(f"{base}/v2/repository/index", data=b"{}", headers=t.headers(admin=True))
    if status != 200:
        detail = f"repository index: {status} {body[:120]}"
        fix = ("the index is an admin API: pass --admin-key-file" if status in (401, 403)
               else "explicit model control (`tritonchat serve`) serves the index")
        names = [t.model, "preprocessing", "generator", "postprocessing"]
        rows = [Check("models", "warn", detail, fix)]
        for name in dict.fromkeys(names):
            s, _ = _request(f"{base}/v2/models/{name}/ready", headers=t.headers())
            rows.append(Check(f"model {name}", "ok" if s == 200 else "fail", "ready" if s == 200 else f"ready: {s}",
                              "" if s == 200 else _load_fix("")))
        return rows
    index = _json(body) or []
    if not index:
        return [Check("models", "fail", "the repository index is empty", "point --model-repository at a repository "
                      "built by `tritonchat build`")]
    rows = []
    by_model: Dict[str, list] = {}
    for e in index:
        by_model.setdefault(e.get("name", "?"), []).append(e)
    for name, entries in sorted(by_model.items()):
        ready = [e for e in entries if e.get("state") == "READY"]
        if ready:
            rows.append(Check(f"model {name}", "ok", "ready: version " + ", ".join(e["version"] for e in ready)))
        else:
            reason = "; ".join(f"{e.get('version', '?')}: {e.get('state', '?')} {e.get('reason', '')}".strip()
                               for e in entries)
            rows.append(Check(f"model {name}", "fail", reason, _load_fix(reason)))
    if t.model not in by_model:
        rows.append(Check(f"model {t.model}", "fail", "not in the repository", "the entry model is missing: "
                          "rebuild the repository, or pass --model NAME"))
    return rows


def _inference_check(t: Target, base: str) -> Check:
    import json
    import time

    body = json.dumps({"text_input": "Hello", "max_tokens": 1}).encode()
    t0 = time.perf_counter()
    status, text = _request(f"{base}/v2/models/{t.model}/generate", data=body, headers=t.headers(), timeout=60)
    ms = (time.perf_counter() - t0) * 1e3
    name = "inference (Python stubs)"
    if status == 200:
        return Check(name, "ok", f"one token from {t.model} in {ms:.0f} ms")
    error = _json(text).get("error", text)[:200] if text else ""
    if status in (401, 403):
        return Check(name, "fail", f"{status}: {error}", "inference needs the API key: pass --api-key-file")
    if status == 503 or "unavailable" in error.lower():
        return Check(name, "fail", f"{status}: {error}", "overloaded (every KV-cache slot busy and the waiting line "
                     "full) or not ready: scale out, or raise generator.max_queue_size / max_batch_size")
    if "stub" in error.lower() and "not healthy" in error.lower():
        return Check(name, "fail", f"{status}: {error}", "a Python backend stub died (a crash, or the OOM killer: "
                     "dmesg); `tritonchat serve` restarts the server; give /dev/shm and memory room")
    return Check(name, "fail", f"{status or 'no answer'}: {error}", _load_fix(error))


def _metrics_checks(t: Target) -> List[Check]:
    url = t.metrics_url
    if url is None:
        host, _, port = t.url.rpartition(":")
        url = f"{host}:8002" if port == "8000" else None
    if url is None:
        return [Check("metrics", "skip", "pass --metrics-url host:port (not the default port layout)")]
    murl = url if "://" in url else f"http://{url}"
    status, text = _request(f"{murl}/metrics", timeout=10)
    if status != 200:
        return [Check("metrics scrape", "fail", f"{murl}/metrics: {status or text}",
                      "the metrics port must answer for Prometheus and the HPA: check --metrics-port and "
                      "--allow-metrics (serve turns it on)")]
    rows = []
    has_triton, has_ours = "nv_inference_count" in text, "tritonchat_" in text
    rows.append(Check("metrics scrape", "ok" if has_triton and has_ours else "warn",
                      f"{murl}/metrics: Triton's {'yes' if has_triton else 'no'}, the generator's "
                      f"{'yes' if has_ours else 'no'}",
                      "" if has_ours else "the generator's metrics appear once it has loaded"))
    rejected = sum(_metric_values(text, "tritonchat_rejected_requests_total"))
    waiting = sum(_metric_values(text, "tritonchat_waiting_requests"))
    running = sum(_metric_values(text, "tritonchat_running_sequences"))
    rows.append(Check("overload", "warn" if rejected else "ok",
                      f"{running:.0f} running, {waiting:.0f} waiting, {rejected:.0f} refused since start",
                      "" if not rejected else "requests were refused (503): scale out (the HPA's waiting-requests "
                      "target), or raise generator.max_queue_size / queue_timeout_ms"))
    restarts = max(_metric_values(text, "tritonchat_server_restarts") or [0])
    if restarts:
        rows.append(Check("restarts", "warn", f"`tritonchat serve` restarted the server {restarts:.0f} time(s)",
                          "a fault killed it: the serve log says which (a stub crash, a hang)"))
    gpus = _metric_values(text, "nv_gpu_memory_total_bytes")
    rows.append(Check("GPUs the server sees", "ok", f"{len(gpus)} GPU(s)" if gpus else "none (serving on CPU)"))
    return rows


def _local_checks(t: Target) -> List[Check]:
    """What this machine shows (run doctor where the server runs: `docker exec`, `kubectl exec`)."""
    import shutil
    import subprocess

    rows = []
    smi = shutil.which("nvidia-smi")
    driver_cuda = None
    if smi:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        import re

        m = re.search(r"Driver Version:\s*([\d.]+).*?CUDA Version:\s*([\d.]+)", out.stdout)
        if out.returncode != 0 or not m:
            rows.append(Check("GPU driver", "fail", (out.stderr or out.stdout).strip()[:200],
                              "nvidia-smi fails: the driver is not loaded, or the container has no GPU "
                              "(--gpus all; nvidia.com/gpu in the pod; the NVIDIA Container Toolkit)"))
        else:
            driver_cuda = m.group(2)
            rows.append(Check("GPU driver", "ok", f"driver {m.group(1)}, supports CUDA up to {driver_cuda}"))
    try:
        import torch

        built = torch.version.cuda
        major_minor = lambda v: tuple(map(int, v.split(".")[:2]))  # noqa: E731
        if built and driver_cuda and major_minor(built) > major_minor(driver_cuda):
            rows.append(Check("driver / CUDA / torch", "fail", f"torch {torch.__version__} needs CUDA {built}, the "
                              f"driver supports {driver_cuda}", "update the driver, or install a torch built for "
                              f"CUDA <= {driver_cuda}"))
        elif built and driver_cuda and not torch.cuda.is_available():
            rows.append(Check("driver / CUDA / torch", "fail", f"torch {torch.__version__} (CUDA {built}) sees no GPU",
                              "the GPU is not visible here: CUDA_VISIBLE_DEVICES, --gpus, the device plugin"))
        else:
            what = f"CUDA {built}" if built else "CPU-only build"
            rows.append(Check("driver / CUDA / torch", "ok", f"torch {torch.__version__} ({what})"
                              + ("" if driver_cuda or not built else "; no NVIDIA driver here: serving on CPU")))
    except Exception as exc:  # noqa: BLE001 - torch is optional for serving ONNX
        rows.append(Check("driver / CUDA / torch", "warn", f"torch not importable: {_first_line(exc)}"))
    rows.append(_cpu_check())
    rows.append(_space_check("shared memory", Path("/dev/shm"), SHM_MIN_TOTAL, SHM_MIN_FREE,
                             "give the container a larger /dev/shm: docker run --shm-size=1g; compose shm_size; "
                             "Kubernetes: an emptyDir with medium: Memory at /dev/shm"))
    if t.repo is not None:
        rows.append(_space_check("disk (repository)", Path(t.repo), 0, DISK_MIN_FREE,
                                 "free space where the repository lives: a hot update copies a version beside the old"))
    return rows


def _cpu_check() -> Check:
    """The CPUs this process may use: its affinity and its cgroup's quota (a pod's CPU limit), which size the
    engine's threads, the GPU tuner's compiles and the streaming rate (python_backend/cpus.py)."""
    from tritonchat.python_backend.cpus import cgroup_cpu_quota, usable_cpus

    cores, quota, usable = len(os.sched_getaffinity(0)), cgroup_cpu_quota(), usable_cpus()
    detail = f"{usable} usable ({cores} cores, " + (f"CPU quota {quota:g})" if quota else "no CPU quota)")
    if usable < 2:
        return Check("CPUs", "warn", detail, "the server runs several processes (tritonserver, the entry, the "
                     "generator): give the container at least 2 CPUs (Kubernetes limits.cpu; docker run --cpus)")
    return Check("CPUs", "ok", detail)


def _space_check(name: str, path: Path, least_total: int, least_free: int, fix: str) -> Check:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return Check(name, "warn", f"{path}: {exc}")
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    detail = f"{path}: {free / 2**20:,.0f} MB free of {total / 2**20:,.0f} MB"
    if free < least_free:
        return Check(name, "fail", detail, fix)
    if total < least_total:
        return Check(name, "warn", detail, fix)
    return Check(name, "ok", detail)


MARK = {"ok": OK, "warn": "[yellow]warn[/]", "fail": "[red]fail[/]", "skip": "[dim]skip[/]"}


def run_doctor_url(target: Target) -> int:
    """Print the checklist and a fix per failure; 1 when anything failed."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    checks = check_deployment(target)
    table = Table(title=f"tritonchat doctor --url {target.url}")
    table.add_column("check")
    table.add_column("", justify="center")
    table.add_column("details", overflow="fold")
    for c in checks:
        table.add_row(escape(c.name), MARK[c.status], escape(c.detail))
    console.print(table)
    fixes = [c for c in checks if c.fix and c.status in ("fail", "warn")]
    for i, c in enumerate(fixes, 1):
        console.print(f"{i}. [bold]{escape(c.name)}[/]: {escape(c.fix)}", soft_wrap=True)
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        console.print(f"[bold red]{len(failed)} check(s) failed.[/]")
        return 1
    console.print("[green]The deployment answers.[/]")
    return 0

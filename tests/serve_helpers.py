"""`tritonchat serve` as a subprocess (what users run) for the fault, supervisor and security tests: free
loopback ports, output in files, every process it started stopped by pid at the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

from tritonchat.server import free_ports
from tritonchat.supervisor import Stub, find_stubs

TRITONCHAT = Path(sys.executable).parent / "tritonchat"


def http_status(url: str, timeout: float = 2.0, data: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Optional[int]:
    """The HTTP status of one request (None: nothing answered)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


class Serve:
    """One `tritonchat serve` process. ``start()`` waits for /v2/health/ready; ``stop()`` ends it and
    everything it started (SIGTERM, then SIGKILL of every process group seen)."""

    def __init__(self, repo: Path, workdir: Path, *args: str, env: Optional[Dict[str, str]] = None,
                 host: str = "127.0.0.1"):
        self.repo = Path(repo)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.host = host
        self.args = [str(a) for a in args]
        self.env = dict(os.environ, **(env or {}))
        self.proc: Optional[subprocess.Popen] = None
        self.servers_seen: Set[int] = set()
        self.out_path = self.workdir / "serve.out"
        self.err_path = self.workdir / "serve.err"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> List[str]:
        return [str(TRITONCHAT), "serve", "--model-repository", str(self.repo), "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port), *self.args]

    def start(self, timeout: float = 180.0, wait: bool = True) -> "Serve":
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def ready(self) -> bool:
        return http_status(f"http://{self.http_url}/v2/health/ready", timeout=1.0) == 200

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds until /v2/health/ready answered 200 and the supervisor watches the new server (fails if serve
        exits or time runs out)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonchat serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            pid = self.server_pid()
            if self.ready() and pid is not None and self.watched() == pid:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout} s:\n{self.log()[-4000:]}")

    def watched(self) -> Optional[int]:
        """The tritonserver pid serve's supervisor last started watching (its log says so)."""
        found = re.findall(r"watching tritonserver \(pid (\d+)\)", self.err())
        return int(found[-1]) if found else None

    def server_pid(self) -> Optional[int]:
        """The tritonserver that serve runs now (None: none running)."""
        assert self.proc is not None
        for pid in children(self.proc.pid):
            try:
                name = Path(os.readlink(f"/proc/{pid}/exe")).name
            except OSError:
                continue
            if name == "tritonserver" and alive(pid):
                self.servers_seen.add(pid)
                return pid
        return None

    def stubs(self) -> Dict[int, Stub]:
        pid = self.server_pid()
        return find_stubs(pid) if pid else {}

    def stub_of(self, model: str) -> Stub:
        stubs = sorted((s for s in self.stubs().values() if s.model == model), key=lambda s: s.instance)
        assert stubs, f"no Python backend stub for model {model!r}: {self.stubs()}"
        return stubs[0]

    def server_env(self) -> Dict[str, str]:
        pid = self.server_pid()
        assert pid is not None
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)

    def log(self) -> str:
        text = ""
        for p in (self.out_path, self.err_path):
            try:
                text += p.read_text(errors="replace")
            except OSError:
                pass
        return text

    def err(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            m = re.search(pattern, self.err())
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in serve's log after {timeout} s:\n{self.err()[-4000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.server_pid()  # remember the current server, in case serve must be killed
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.servers_seen | {self.proc.pid}:  # tritonserver's group holds its stubs
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return self.proc.returncode


# ------------------------------------------------------------------------------------------- tiny models

ECHO_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 1 ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""

# a tiny Python model; after a restart it fails to load when the test asks for it (a model that cannot
# load again: the supervisor must give up instead of restarting it forever)
ECHO_MODEL = """
import os
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        restarts = os.environ.get("TRITONCHAT_SERVER_RESTARTS", "?")
        if restarts != "0" and os.environ.get("ECHO_FAIL_AFTER_RESTART"):
            raise RuntimeError(f"cannot load after a restart: restarts={restarts} "
                               f"reason={os.environ.get('TRITONCHAT_RESTART_REASON', '?')}")

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
"""


# a model whose loading fails with a message the tests look for
BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("tokenizer.json is missing: kaboom-4711")

    def execute(self, requests):
        return []
"""


def echo_repo(root: Path, *names: str, model_py: str = ECHO_MODEL) -> Path:
    """A repository of tiny Python models (load in about a second)."""
    for name in names:
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(textwrap.dedent(ECHO_CONFIG.format(name=name)).lstrip())
        (root / name / "1" / "model.py").write_text(textwrap.dedent(model_py).lstrip())
    return root


# ------------------------------------------------------------------------------------------- streams


@dataclass
class StreamRun:
    """One streamed request in a thread: when its first text came, how and when it ended."""

    protocol: str
    first: threading.Event
    outcome: str = ""  # "done" | the error class name
    message: str = ""
    tokens: int = 0
    ended_at: float = 0.0
    thread: Optional[threading.Thread] = None


def start_streams(url_by_protocol: Dict[str, str], protocols: List[str], max_tokens: int,
                  prompt: str = "Once upon a time", api_key: Optional[str] = None) -> List[StreamRun]:
    from tritonchat.client import ChatClient, GenerationParams, TritonChatError

    params = GenerationParams(max_tokens=max_tokens, min_tokens=max_tokens)
    runs: List[StreamRun] = []

    def work(run: StreamRun) -> None:
        try:
            with ChatClient(url_by_protocol[run.protocol], protocol=run.protocol, timeout=120,
                            api_key=api_key) as client:
                for delta in client.stream(prompt, params):
                    run.first.set()
                    run.tokens = delta.num_output_tokens or run.tokens
                run.outcome = "done"
        except TritonChatError as exc:
            run.outcome, run.message = type(exc).__name__, exc.message
        except Exception as exc:  # anything else is a client bug the test should show
            run.outcome, run.message = f"unexpected {type(exc).__name__}", str(exc)
        finally:
            run.ended_at = time.monotonic()
            run.first.set()

    for protocol in protocols:
        run = StreamRun(protocol, threading.Event())
        run.thread = threading.Thread(target=work, args=(run,), daemon=True)
        runs.append(run)
        run.thread.start()
    return runs

"""Keep tritonserver serving (`tritonchat serve`): watch it and its Python-backend stubs, fail in-flight
requests fast on a fault, restart it on the same ports, and stop it quickly.

Why a whole-server restart: when a stub dies (OOM killer, a segfault in an engine, ``kill -9``),
tritonserver keeps answering ``/v2/health/ready`` with 200 and the requests that were inside the stub
wait forever (seen with 2.51: 12 of 12 streams silent for 60 s+, readiness 200 for 10 minutes). Killing
the server's process group closes every client connection at once (each in-flight request gets an error
now, not never), readiness goes false (nothing listens), and a fresh server loads every model again.

What is watched, every ``poll_s`` (0.1 s):

* the tritonserver process itself (exited, killed);
* every child whose program is ``triton_python_backend_stub`` (one per model instance; /proc is scanned
  for them every ``scan_s``, 0.5 s, so models loaded later through the repository API are watched too, and
  a stub that died before it was ever seen is caught). A stub that is a zombie with a non-zero status
  while tritonserver's repository index still calls its model version READY is a crash (tritonserver
  itself collects a dead stub only when the next request reaches it); a stub that exits with status 0, or
  whose model is being unloaded, is tritonserver's own doing; a stub that died with its server (the stubs
  abort when it dies, and can be seen dead first) is reported as the server's fault;
* ``/v2/health/live``, once a second: silent for ``liveness_timeout_s`` means hung.

Restarts are bounded: a restart that fails to become ready, or a server that fails again within
``fast_window_s`` of becoming ready, is a *fast failure*; after ``max_restarts`` fast failures in a row the
supervisor gives up (exit status 1) instead of looping on a model that cannot load. The delay before a
restart doubles with each fast failure in a row (0 s for the first). Each new server learns its restart
count and the last reason from ``TRITONCHAT_SERVER_RESTARTS`` / ``TRITONCHAT_RESTART_REASON``.

Log lines (stderr, logger ``tritonchat.serve``) say what happened: ``fault: ...``, ``recovered in N s``,
``giving up ...``, ``shutdown: ...``. Command lines and keys: :mod:`tritonchat.server`, :mod:`tritonchat.security`.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

from tritonchat.procs import http_request
from tritonchat.server_log import failure_reason, is_failure_line

__all__ = ["Supervisor", "RestartPolicy", "Stub", "find_stubs", "scan_stubs", "process_state", "describe_status",
           "ENV_RESTARTS", "ENV_REASON"]

log = logging.getLogger("tritonchat.serve")

STUB_PROGRAM = "triton_python_backend_stub"
ENV_RESTARTS = "TRITONCHAT_SERVER_RESTARTS"
ENV_REASON = "TRITONCHAT_RESTART_REASON"
# how long a server that stopped answering gets to be seen dead when one of its stubs died (`_judge_dead_stub`)
SERVER_EXIT_GRACE_S = 1.0


# --------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: the model instance it runs."""

    pid: int
    model: str
    version: str
    instance: str

    def describe(self) -> str:
        return (f"Python backend stub of model '{self.model}' version {self.version} "
                f"(instance {self.instance}, pid {self.pid})")


def _read_stat(pid: int) -> Optional[Tuple[str, List[str]]]:
    """(command name, the fields after it: [state, ppid, pgrp, ...]) from /proc/<pid>/stat; None: gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")
    return head.partition("(")[2], tail.split()


def _exit_status(fields: List[str]) -> int:
    # field 52 of /proc/<pid>/stat: the status waitpid() would report (kept while the process is a zombie)
    return int(fields[49]) if len(fields) > 49 and fields[49].lstrip("-").isdigit() else 0


def process_state(pid: int) -> Optional[Tuple[str, int]]:
    """(state letter, exit status as waitpid reports it) or None when the process is gone. The exit status is
    only meaningful for a zombie ('Z'): the process died and its parent has not collected it yet."""
    st = _read_stat(pid)
    return None if st is None else (st[1][0], _exit_status(st[1]))


def describe_status(status: int, *, waitpid: bool = True) -> str:
    """'killed by SIGKILL' / 'exited with code 3' from a waitpid status (or a Popen returncode)."""
    if waitpid:
        sig, code = status & 0x7F, (status >> 8) & 0xFF
    else:
        sig, code = (-status, 0) if status < 0 else (0, status)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"exited with code {code}"


def scan_stubs(server_pid: int) -> Tuple[Dict[int, Stub], Dict[int, int]]:
    """The Python-backend stubs of `server_pid`: ({pid: Stub} of the live ones, {pid: exit status} of the dead
    ones tritonserver has not collected). A stub is a child of the server or in its process group (where it
    stays if the server dies); the whole of /proc is read because the per-thread ``children`` lists can miss
    a child while it is handed from an exiting thread (tritonserver's model-loading threads) to another.

    A live stub's command line names its model: ``triton_python_backend_stub <repo>/<model>/<version>/model.py
    <shm> <size> <size> <parent pid> <backend dir> <ipc handle> <instance name> ...``; a zombie has no
    command line left, only its (truncated) command name."""
    alive: Dict[int, Stub] = {}
    dead: Dict[int, int] = {}
    me = str(server_pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == me:
            continue
        st = _read_stat(int(entry))
        if st is None or me not in (st[1][1], st[1][2]) or not STUB_PROGRAM.startswith(st[0]):
            continue
        pid = int(entry)
        if st[1][0] in "ZX":
            dead[pid] = _exit_status(st[1])
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv or Path(argv[0]).name != STUB_PROGRAM:
            continue
        model_py = Path(argv[1]) if len(argv) > 1 else Path("?/?/?")
        alive[pid] = Stub(pid, model_py.parent.parent.name, model_py.parent.name, argv[8] if len(argv) > 8 else "?")
    return alive, dead


def find_stubs(server_pid: int) -> Dict[int, Stub]:
    """The live Python-backend stubs of `server_pid`, by pid (see :func:`scan_stubs`)."""
    return scan_stubs(server_pid)[0]


_PRCTL: Optional[Callable[..., int]] = None


def _prepare_die_with_parent() -> Callable[[], None]:
    """A pre-exec hook that makes the kernel SIGKILL tritonserver when `serve` dies (even by SIGKILL), so no
    server is left holding the ports. prctl is looked up here, in the parent: the child, forked from a
    process with threads, only calls it."""
    global _PRCTL
    if _PRCTL is None:
        try:
            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _PRCTL = lambda *a: 0  # noqa: E731 - not Linux: no parent-death signal
    prctl = _PRCTL

    def hook() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    return hook


# --------------------------------------------------------------------------------------------- policy


@dataclass
class RestartPolicy:
    max_restarts: int = 5  # fast failures in a row before giving up; 0: never restart (exit on a fault)
    fast_window_s: float = 60.0  # a server that fails sooner than this after becoming ready failed fast
    backoff_s: float = 1.0  # delay before the 2nd restart in a row; doubles after that
    backoff_max_s: float = 30.0
    liveness_timeout_s: float = 10.0  # /v2/health/live silent this long: hung
    shutdown_timeout_s: float = 4.0  # SIGTERM, then SIGKILL of the process group after this
    restart_timeout_s: float = 120.0  # at least; a restart may take 3x the first start's time

    def delay(self, fast_failures: int) -> float:
        if fast_failures <= 1:
            return 0.0
        return min(self.backoff_s * 2 ** (fast_failures - 2), self.backoff_max_s)


# --------------------------------------------------------------------------------------------- one server


@dataclass
class _Server:
    """One tritonserver process of the supervisor and what it printed."""

    proc: subprocess.Popen
    started: float
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    important: List[str] = field(default_factory=list)
    pump: Optional[threading.Thread] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "".join(self.important + list(self.tail))

    def kill_group(self) -> None:
        """SIGKILL tritonserver and every process of its group (the stubs), and collect it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self.pump is not None:
            self.pump.join(timeout=2)


class _Liveness(threading.Thread):
    """Asks /v2/health/live once a second; `silent_for()` is the time since the last 200."""

    def __init__(self, url: str, timeout: float):
        super().__init__(daemon=True, name="tritonchat-liveness")
        self.url, self.timeout = url, timeout
        self.last_ok = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if http_request(self.url, timeout=self.timeout)[0] == 200:
                self.last_ok = time.monotonic()
            self.done.wait(1.0)

    def silent_for(self) -> float:
        return time.monotonic() - self.last_ok


class _Stop(Exception):
    """A signal asked the supervisor to stop."""


# --------------------------------------------------------------------------------------------- supervisor


class Supervisor:
    """Run `command` (a tritonserver command line) until a signal stops it, restarting it on faults.

    `http_url` (host:port) is where health and the repository index are asked; `metrics_url` where the
    in-flight gauges are read at shutdown. `redact` is applied to every line of the server's output that is
    passed through to `out`. `admin_headers` go with the repository-index request (an admin key)."""

    def __init__(self, command: List[str], env: Dict[str, str], http_url: str, *,
                 metrics_url: Optional[str] = None, policy: Optional[RestartPolicy] = None,
                 redact: Callable[[str], str] = lambda s: s, admin_headers: Optional[Dict[str, str]] = None,
                 out: Optional[BinaryIO] = None, poll_s: float = 0.1, scan_s: float = 0.5):
        self.command = list(command)
        self.env = dict(env)
        self.http_url = http_url
        self.metrics_url = metrics_url
        self.policy = policy or RestartPolicy()
        self.redact = redact
        self.admin_headers = dict(admin_headers or {})
        self.out = out if out is not None else getattr(sys.stdout, "buffer", None)
        self.poll_s = poll_s  # known stubs, the server process
        self.scan_s = scan_s  # the /proc scan for new and unseen-dead stubs
        self.restarts = 0
        self.failure: Optional[str] = None  # why the first start failed (the caller shows it)
        self._stop = threading.Event()
        self._stop_signal: Optional[int] = None
        self._hard_stop = threading.Event()
        self._server: Optional[_Server] = None

    # ---- signals ------------------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop (as a SIGTERM/SIGINT would); a second call kills at once."""
        if self._stop.is_set():
            self._hard_stop.set()
        self._stop_signal = signum
        self._stop.set()

    def run(self) -> int:
        """Serve until stopped; returns the exit status (0 after a requested stop)."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, lambda s, _f: self.request_stop(s)) for sig in handled}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._server is not None:
                self._server.kill_group()

    # ---- the loop -----------------------------------------------------------------------------

    def _run(self) -> int:
        policy = self.policy
        reason = ""
        fast_failures = 0
        fault_at: Optional[float] = None
        first_start_s: Optional[float] = None
        while True:
            server = self._spawn(reason)
            try:
                limit = None if first_start_s is None else max(policy.restart_timeout_s, 3 * first_start_s)
                problem = self._wait_ready(server, limit)
                ready_at = time.monotonic()
                if problem is None:
                    took = ready_at - server.started
                    if first_start_s is None:
                        first_start_s = took
                        log.info("tritonserver (pid %d) ready in %.1f s", server.pid, took)
                    else:
                        log.warning("recovered in %.1f s (restart %d, after: %s); tritonserver pid %d",
                                    ready_at - (fault_at or server.started), self.restarts, reason, server.pid)
                    fault = self._watch(server)
                else:
                    if first_start_s is None:  # the first start: a configuration problem, not a fault
                        self.failure = problem
                        server.kill_group()
                        return self._exit_status(server)
                    ready_at = None
                    fault = f"restart {self.restarts} failed: {problem}"
            except _Stop:
                return self._shutdown(server)
            fault_at = fault_at if (ready_at is None and fault_at is not None) else time.monotonic()
            log.error("fault: %s", fault)
            server.kill_group()
            log.warning("killed tritonserver's process group (pid %d: the server and its stubs): requests in "
                        "flight fail now and readiness is false until the restart is ready", server.pid)
            quick = ready_at is None or time.monotonic() - ready_at < policy.fast_window_s
            fast_failures = fast_failures + 1 if quick else 1
            if fast_failures > policy.max_restarts:
                if policy.max_restarts == 0:
                    log.error("giving up: restarts are off (--max-restarts 0); last fault: %s", fault)
                else:
                    log.error("giving up after %d failures in a row (each within %.0f s of starting); last "
                              "fault: %s", fast_failures, policy.fast_window_s, fault)
                return 1
            self.restarts += 1
            reason = fault
            wait = policy.delay(fast_failures)
            log.warning("restarting tritonserver (restart %d%s)", self.restarts,
                        f", in {wait:.0f} s: {fast_failures} fast failures in a row" if wait else "")
            if self._stop.wait(wait):
                log.info("shutdown: stopped while waiting to restart")
                return 0

    def _exit_status(self, server: _Server) -> int:
        rc = server.proc.returncode
        if rc is None or rc == 0:
            return 1
        return rc if rc > 0 else 128 - rc

    def _spawn(self, reason: str) -> _Server:
        env = dict(self.env)
        env[ENV_RESTARTS] = str(self.restarts)
        env[ENV_REASON] = reason[:500]
        proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=_prepare_die_with_parent())
        server = _Server(proc, time.monotonic())
        server.pump = threading.Thread(target=self._pump, args=(server,), daemon=True, name="tritonchat-pump")
        server.pump.start()
        self._server = server
        return server

    def _pump(self, server: _Server) -> None:
        """Pass the server's output through (keys redacted) and keep what may explain a failure."""
        assert server.proc.stdout is not None
        for raw in iter(server.proc.stdout.readline, b""):
            line = self.redact(raw.decode(errors="replace"))
            if self.out is not None:
                try:
                    self.out.write(line.encode())
                    self.out.flush()
                except (OSError, ValueError):
                    pass
            server.tail.append(line)
            if is_failure_line(line):
                server.important.append(line)

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stop()

    def _wait_ready(self, server: _Server, limit: Optional[float]) -> Optional[str]:
        """None once /v2/health/ready answers 200; else why not (exited, too slow)."""
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            self._check_stop()
            rc = server.proc.poll()
            if rc is not None:
                if server.pump is not None:
                    server.pump.join(timeout=2)  # the whole log, for the reason
                return (f"tritonserver {describe_status(rc, waitpid=False)} while starting: "
                        f"{failure_reason(server.output())}")
            if http_request(url, timeout=1.0)[0] == 200:
                return None
            if limit is not None and time.monotonic() - server.started > limit:
                return f"tritonserver was not ready {limit:.0f} s after starting"
            self._stop.wait(0.2)

    def _watch(self, server: _Server) -> str:
        """Block while all is well; return why not (or raise _Stop)."""
        known, _ = scan_stubs(server.pid)
        dismissed: set = set()  # dead stubs that tritonserver stopped itself (an unload)
        log.info("watching tritonserver (pid %d) and %d Python backend stubs (%s)", server.pid, len(known),
                 ", ".join(sorted(s.instance for s in known.values())) or "none")
        live = _Liveness(f"http://{self.http_url}/v2/health/live", timeout=min(2.0, self.policy.liveness_timeout_s))
        live.start()
        last_scan = 0.0
        try:
            while True:
                rc = server.proc.poll()
                if rc is not None:
                    return f"tritonserver (pid {server.pid}) {describe_status(rc, waitpid=False)}"
                dead: Dict[int, int] = {}
                for pid in list(known):  # every round: the stubs seen alive (cheap)
                    state = process_state(pid)
                    if state is None:  # collected by tritonserver: an unload or a reload
                        del known[pid]
                    elif state[0] in "ZX":
                        dead[pid] = state[1]
                now = time.monotonic()
                if now - last_scan >= self.scan_s:  # new stubs (loads), and stubs that died unseen
                    last_scan = now
                    alive, zombies = scan_stubs(server.pid)
                    for pid, stub in alive.items():
                        known.setdefault(pid, stub)
                    dead.update(zombies)
                for pid, status in dead.items():
                    if status == 0 or pid in dismissed:  # a clean exit: tritonserver unloading the model
                        continue
                    stub = known.get(pid) or Stub(pid, "?", "?", "?")
                    fault = self._judge_dead_stub(server, stub, status)
                    if fault:
                        return fault
                    dismissed.add(pid)
                silent = live.silent_for()
                if silent > self.policy.liveness_timeout_s:
                    return f"tritonserver (pid {server.pid}) stopped answering /v2/health/live for {silent:.0f} s"
                if self._stop.wait(self.poll_s):
                    raise _Stop()
        finally:
            live.done.set()

    def _judge_dead_stub(self, server: _Server, stub: Stub, status: int) -> Optional[str]:
        """Why a dead stub is a fault, or None when tritonserver is unloading its model (it stopped it).
        The stubs abort when tritonserver dies, so a dying server is the cause, not the stub that
        followed it: a stub can see its server's pipes close before the server has exited (Linux closes
        a dying process's files before it turns it into a zombie), so where the server does not answer
        its repository index it gets SERVER_EXIT_GRACE_S to be seen dead (both seen in full test runs)."""
        rc = server.proc.poll()
        if rc is None:
            states = self._index()
            if states is None:
                try:
                    rc = server.proc.wait(SERVER_EXIT_GRACE_S)
                except subprocess.TimeoutExpired:
                    return (f"{stub.describe()} {describe_status(status)} (and tritonserver did not answer its "
                            "repository index)")
        if rc is not None:
            return f"tritonserver (pid {server.pid}) {describe_status(rc, waitpid=False)}"
        if stub.model == "?":  # died before the supervisor saw it alive: its model is not known
            if any(v in ("UNLOADING", "LOADING") for v in states.values()):
                return None
            return f"a Python backend stub (pid {stub.pid}, model unknown: it died at once) {describe_status(status)}"
        if states.get((stub.model, stub.version), "UNAVAILABLE") != "READY":
            return None
        return f"{stub.describe()} {describe_status(status)}"

    def _index(self) -> Optional[Dict[Tuple[str, str], str]]:
        """{(model, version): state} from tritonserver's repository index (None: no answer)."""
        status, body = http_request(f"http://{self.http_url}/v2/repository/index", timeout=1.0, data=b"{}",
                             headers=self.admin_headers)
        if status != 200:
            return None
        try:
            return {(str(e.get("name", "")), str(e.get("version", ""))): str(e.get("state", ""))
                    for e in json.loads(body)}
        except (ValueError, AttributeError, TypeError):
            return None

    # ---- shutdown -----------------------------------------------------------------------------

    def in_flight(self) -> Optional[Tuple[int, int]]:
        """(running sequences, waiting requests) summed over the generator models, from the metrics port."""
        if not self.metrics_url:
            return None
        status, body = http_request(f"http://{self.metrics_url}/metrics", timeout=0.5)
        if status != 200:
            return None
        from prometheus_client.parser import text_string_to_metric_families

        totals = {"tritonchat_running_sequences": 0.0, "tritonchat_waiting_requests": 0.0}
        seen = False
        try:
            for family in text_string_to_metric_families(body.decode(errors="replace")):
                if family.name in totals:
                    totals[family.name] += sum(s.value for s in family.samples)
                    seen = True
        except ValueError:
            return None
        if not seen:  # a repository without tritonchat's generator
            return None
        return int(totals["tritonchat_running_sequences"]), int(totals["tritonchat_waiting_requests"])

    def _shutdown(self, server: _Server) -> int:
        t0 = time.monotonic()
        limit = self.policy.shutdown_timeout_s
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "stop"
        counts = self.in_flight() if server.proc.poll() is None else None
        flight = ("requests in flight: unknown" if counts is None else
                  f"{counts[0] + counts[1]} requests in flight ({counts[0]} running, {counts[1]} waiting) are cut off"
                  if counts[0] + counts[1] else "no requests in flight")
        log.info("shutdown (%s): %s; stopping tritonserver (pid %d), at most %.0f s", name, flight, server.pid, limit)
        try:
            server.proc.send_signal(signal.SIGTERM)  # tritonserver's clean shutdown (SIGINT does the same)
        except ProcessLookupError:
            pass
        while server.proc.poll() is None and time.monotonic() - t0 < limit and not self._hard_stop.is_set():
            time.sleep(0.05)
        took = time.monotonic() - t0
        if server.proc.poll() is None:
            server.kill_group()
            why = "a second signal" if self._hard_stop.is_set() else f"it did not stop within {limit:.0f} s"
            log.warning("shutdown: killed tritonserver and its stubs after %.1f s (%s)", took, why)
        else:
            server.kill_group()  # stubs left behind, if any
            status = describe_status(server.proc.returncode, waitpid=False)
            if "Exit timeout expired" in server.output():
                status += ": its --exit-timeout-secs ran out before every model had unloaded"
            log.info("shutdown: tritonserver stopped in %.1f s (%s)", took, status)
        return 0

"""Child processes, ports and a plain HTTP call, shared by the server launcher (server.py), the
gateway's launcher (gateway/process.py), the supervisor and `doctor`."""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Tuple


def stop_process(proc: subprocess.Popen, steps) -> Optional[int]:
    """Send each (signal, seconds to wait) of `steps` in turn until `proc` has exited; its exit code."""
    for sig, wait in steps:
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
    return proc.poll()


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


def http_request(url: str, *, data: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
                 timeout: float = 2.0) -> Tuple[Optional[int], bytes]:
    """GET (POST with `data`) `url`; never raises: (HTTP status, body), or (None, the connection
    error's reason) when nothing answered."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", exc)).encode()

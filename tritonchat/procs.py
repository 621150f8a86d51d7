"""Child processes and ports, shared by the server launcher (server.py) and the gateway's launcher
(gateway/process.py)."""

from __future__ import annotations

import socket
import subprocess
from typing import List, Optional


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

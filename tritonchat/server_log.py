"""Reading a tritonserver log: why did the server not start?"""

from __future__ import annotations

import re
from typing import List

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


# lines of a live server's output worth keeping in full for `failure_reason` (serve_foreground keeps the
# rest as a bounded tail)
FAILURE_MARKERS = ("failed to load '", "Poll failed", "libprotobuf ERROR", "failed to create")


def is_failure_line(line: str) -> bool:
    return any(k in line for k in FAILURE_MARKERS)

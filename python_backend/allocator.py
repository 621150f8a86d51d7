"""glibc malloc settings for the processes that run the models (and the benchmark's peers).

A decode step allocates and frees the same large buffers every time: the KV gathered for ONNX
Runtime, its `present` outputs, the logits (megabytes each). With glibc's defaults a freed
block above the (adaptive) mmap threshold goes back to the kernel, and the top of a heap is
trimmed as soon as 128 KiB-to-a-few-MiB are free, so the next step faults the same pages in
again. On a virtual machine a page fault is expensive: measured on the 2-vCPU VM of
docs/benchmarks.md, ONNX Runtime's decode step of a stories15M-shaped model at batch 16 went
from 25-28 ms to 15-18 ms, and stories260K's from 5.0 ms to 1.6 ms, with nothing else changed.

`keep_freed_memory()` makes freed memory stay in the process for reuse: heaps are never trimmed
and blocks up to 32 MiB come from the heap, not from their own mmap. The process keeps its peak
heap instead of returning it (as ONNX Runtime's and PyTorch's own caching allocators do).
Set TRITONCHAT_MALLOC=default to leave glibc's settings alone.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # never trim below 1 GiB free at the top of a heap
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above to this process (once); False where not applied (not glibc,
    or TRITONCHAT_MALLOC=default)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("TRITONCHAT_MALLOC", "").strip().lower() == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt to speak of, macOS none)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # setting either one stops glibc's adaptive thresholds, so both are set
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied

"""Per-request timestamps across the server's processes, for finding where a first token's time goes.

Off unless the server's environment sets TRITONCHAT_TIMELINE to a folder: each Python backend
process then appends lines "MARK REQUEST_ID SECONDS" to a file of its own there (SECONDS:
`time.perf_counter`, CLOCK_MONOTONIC, one clock for every process of the machine).
`benchmarks/timeline.py` reads the folder and prints the time between the marks, per request's
first token. The marks, in a first token's order:

    entry_start    the entry's flow starts (a worker thread took the request)
    prompt_ready   its prompt is token ids (checked, templated, tokenized)
    gen_execute    the generator's `execute` has the request
    gen_submitted  it is in the scheduler's waiting line
    admitted       the scheduler took it from the line into a slot (for a prefill of its own, or to
                   ride in the next decode step)
    computed       the scheduler has its first token's id (the prefill returned, or the decode step
                   that carried its prompt was taken)
    posted         the scheduler gave the courier the stream's first output
    send_start     a courier or first-token sender starts sending it (request id `?` where unknown)
    send_end       the send returned (the server process took the response; the entry may
                   already have it)
    entry_got      the entry received the generator's first response
    entry_sent     the entry sent its first response to the client
    entry_poll     (not on the way) the entry's flow asked the server whether its client went away:
                   a round trip; a first token due within `cancel_poll_ms` of the start goes out without one

Each mark is one short write; off, it costs a global lookup.
"""

from __future__ import annotations

import os
import threading
import time

_DIR = os.environ.get("TRITONCHAT_TIMELINE", "")
_lock = threading.Lock()
_file = None


def mark(name: str, request_id: str) -> None:
    if _DIR:
        _write(name, request_id)


def _write(name: str, request_id: str) -> None:
    global _file
    line = f"{name} {request_id or '?'} {time.perf_counter():.6f}\n"
    with _lock:
        if _file is None:
            os.makedirs(_DIR, exist_ok=True)
            _file = open(os.path.join(_DIR, f"{os.getpid()}.txt"), "a", buffering=1)
        _file.write(line)

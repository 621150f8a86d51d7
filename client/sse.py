"""Server-Sent Events, as Triton's ``generate_stream`` writes them: one ``data: {json}`` event per
response, events separated by a blank line; an error is ``data: {"error": "..."}``.

:class:`SSEParser` is incremental (feed it whatever bytes arrived; it returns the events completed
so far) and follows the SSE rules that matter here: ``\\n``, ``\\r\\n`` or ``\\r`` line ends,
several ``data:`` lines joined with ``\\n``, ``:`` comment lines and other fields ignored.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional

from .errors import TritonChatError, error_from_status

__all__ = ["SSEParser", "parse_sse", "decode_event", "iter_json_objects"]


class SSEParser:
    def __init__(self) -> None:
        self._buf = b""
        self._data: List[str] = []
        self._has_data = False

    def feed(self, chunk: bytes) -> List[str]:
        """Add bytes; return the ``data`` of every event completed by them."""
        self._buf += chunk
        events: List[str] = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                break
            end, nxt = cut
            line = self._buf[:end]
            self._buf = self._buf[nxt:]
            self._line(line.decode("utf-8", errors="replace"), events)
        return events

    def close(self) -> List[str]:
        """End of the body: a last event not followed by a blank line still counts."""
        events: List[str] = []
        if self._buf:
            line, self._buf = self._buf.rstrip(b"\r"), b""
            self._line(line.decode("utf-8", errors="replace"), events)
        if self._has_data:
            events.append("\n".join(self._data))
        self._data, self._has_data = [], False
        return events

    def _line(self, line: str, events: List[str]) -> None:
        if line == "":
            if self._has_data:
                events.append("\n".join(self._data))
            self._data, self._has_data = [], False
            return
        if line.startswith(":"):
            return  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        # "event", "id", "retry" and unknown fields: not used by Triton's generate_stream


def _line_end(buf: bytes) -> Optional[tuple]:
    """(end of the first line, start of the next) or None if no complete line yet.  A ``\\r`` at the
    very end of the buffer waits for the next byte (it may be the first half of ``\\r\\n``)."""
    n = buf.find(b"\n")
    r = buf.find(b"\r")
    if r == -1 and n == -1:
        return None
    if r != -1 and (n == -1 or r < n):
        if r + 1 == len(buf):
            return None
        return (r, r + 2) if buf[r + 1:r + 2] == b"\n" else (r, r + 1)
    return (n, n + 1)


def decode_event(data: str) -> Dict[str, Any]:
    """One event's JSON; an ``{"error": ...}`` event raises the matching :class:`TritonChatError`."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise TritonChatError(f"malformed event from the server: {data[:200]!r} ({exc})") from None
    if not isinstance(obj, dict):
        raise TritonChatError(f"unexpected event from the server: {data[:200]!r}")
    if "error" in obj:
        raise error_from_status(None, str(obj["error"]))
    return obj


def parse_sse(body: Iterable[bytes]) -> List[Dict[str, Any]]:
    """Parse a whole recorded body (bytes, or chunks of it) into the events' JSON objects.
    Stops with the error at the first error event."""
    if isinstance(body, (bytes, bytearray)):
        body = [bytes(body)]
    parser = SSEParser()
    out: List[Dict[str, Any]] = []
    for chunk in body:
        for data in parser.feed(chunk):
            out.append(decode_event(data))
    for data in parser.close():
        out.append(decode_event(data))
    return out


def iter_json_objects(text: str) -> List[Any]:
    """All JSON values in ``text`` one after the other (Triton's non-streaming ``generate`` may
    append an ``{"error": ...}`` object to a response body)."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)

"""Streaming detokenization that never splits a character, and stop strings on text.

A stateless per-chunk decode (decode each chunk's tokens alone) drops SentencePiece word spaces
and turns a Chinese character split over several byte-level tokens into U+FFFD pieces. Here:

- The generator releases tokens only at *clean points*: positions where the decoded text does
  not end in an incomplete UTF-8 character (U+FFFD) and, for SentencePiece byte fallback, where
  the last token is not a byte token (`<0xE4>`): the ByteFallback decoder renders a whole run of
  byte tokens at once, as text if the run is valid UTF-8 and as one U+FFFD per byte if not, so
  a run must never be split between two releases (a later byte could turn text already sent
  into U+FFFD). Until then the tokens wait.
- Each release is described by a token window `ids[p:n]` and `read_offset = released - p`
  (p a few tokens before the previous release, never on a byte token that continues a character:
  a run cut there is invalid UTF-8 as a whole, and would turn the next bytes, the new text, into
  U+FFFD too). `delta(window, read_offset)` is then
  `decode(window)[len(decode(window[:read_offset])):]`: both decodes start at the same token, so
  start-of-text effects (the stripped leading space, a character cut at `p`) cancel, and the
  deltas concatenate to exactly `decode(ids)`.

The postprocessing model only ever calls `delta`, so it needs no state across responses; the
generator's `TextTracker` uses the same function to keep the text for stop-string matching.
"""

from __future__ import annotations

import dataclasses
import re

REPLACEMENT = "\ufffd"
WINDOW_BACK = 4  # tokens of context kept before the previous release point
TAIL_CHECK = 8  # tokens decoded to decide whether the text ends mid-character


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_byte_ids_cache: dict[int, tuple[frozenset, frozenset]] = {}


def _byte_ids(tokenizer) -> tuple[frozenset, frozenset]:
    key = id(tokenizer)
    if key not in _byte_ids_cache:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        found = {i: int(m.group(1), 16) for t, i in vocab.items() if (m := _BYTE_TOKEN.match(t))}
        _byte_ids_cache[key] = (frozenset(found), frozenset(i for i, b in found.items() if 0x80 <= b < 0xC0))
    return _byte_ids_cache[key]


def byte_token_ids(tokenizer) -> frozenset:
    """Ids of SentencePiece byte-fallback tokens (`<0x00>` ... `<0xFF>`); empty for byte-level BPE."""
    return _byte_ids(tokenizer)[0]


def continuation_byte_ids(tokenizer) -> frozenset:
    """The byte-fallback tokens of UTF-8 continuation bytes (`<0x80>` ... `<0xBF>`): never a window's first."""
    return _byte_ids(tokenizer)[1]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)


def delta(tokenizer, window, read_offset: int, trim_chars: int = 0) -> str:
    """New text of `window[read_offset:]` in the context of `window[:read_offset]`."""
    cur = decode(tokenizer, window)
    prev = decode(tokenizer, window[:read_offset]) if read_offset > 0 else ""
    new = cur[len(prev):] if cur.startswith(prev) else cur[_common_prefix(cur, prev):]
    return new[: len(new) - trim_chars] if trim_chars > 0 else new


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclasses.dataclass
class Release:
    """What the generator sends to postprocessing for one response."""

    window: list[int]
    read_offset: int
    trim_chars: int = 0
    start: int = 0  # absolute index of window[0] in the sequence's text ids

    def merge(self, later: "Release") -> "Release":
        """One release covering this one and the `later` one (for a stream that fell behind)."""
        head = self.window[: later.start - self.start]
        return Release(head + later.window, self.read_offset, later.trim_chars, self.start)


class TextTracker:
    """Per-sequence release bookkeeping and stop-string detection (generator side)."""

    def __init__(self, tokenizer, prefix_ids=(), stop_words=(), context_ids=()):
        """`prefix_ids`: ids whose text is sent first (the prompt, where the output includes it).
        `context_ids`: ids the text continues but never sends (the prompt's last tokens, where the
        output continues a raw prompt: its first word keeps the space before it, so that prompt +
        output is the text of both, as SentencePiece's decoder strips a space only at the start)."""
        self.tok = tokenizer
        self.byte_ids = byte_token_ids(tokenizer)
        self.mid_char_ids = continuation_byte_ids(tokenizer)
        context = list(map(int, context_ids))
        context = context[self._window_start(context, len(context)):]  # all a release looks back at
        self.ids: list[int] = context + list(map(int, prefix_ids))
        self.released = len(context)  # ids whose text was sent (or is never sent)
        self.stop_words = [s for s in stop_words if s]
        self.max_stop = max((len(s) for s in self.stop_words), default=0)
        # text bookkeeping only needed for stop strings
        self.text = ""  # decoded text of ids[:clean]
        self.clean = 0
        self.released_chars = 0
        self.trim = 0  # chars to cut at the end once a stop string matched
        if self.stop_words and self.ids:  # the prompt is part of the text: never match inside it
            self.text, self.clean = decode(tokenizer, self.ids), len(self.ids)
        self.floor = len(self.text)

    def append(self, token: int) -> bool:
        """Add a generated token; return True when a stop string now ends the text."""
        self.ids.append(int(token))
        if not self.stop_words or not self._is_clean(len(self.ids)):
            return False
        p = self._window_start(self.ids, self.clean)
        self.text += delta(self.tok, self.ids[p:], self.clean - p)
        self.clean = len(self.ids)
        start = max(self.floor, self.released_chars - self.max_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.stop_words) if i >= 0]
        if hits:
            self.trim = len(self.text) - min(hits)
            return True
        return False

    def _window_start(self, ids: list[int], k: int) -> int:
        """Where a window reaching back from position k starts: WINDOW_BACK tokens before it, or up to
        3 more where that is inside a character's byte tokens (module docstring)."""
        p = max(0, k - WINDOW_BACK)
        for _ in range(3):  # a character's lead byte is at most 3 before any of its bytes
            if p == 0 or ids[p] not in self.mid_char_ids:
                break
            p -= 1
        return p

    def _is_clean(self, n: int) -> bool:
        if n and self.ids[n - 1] in self.byte_ids:
            return False
        return not decode(self.tok, self.ids[max(0, n - TAIL_CHECK):n]).endswith(REPLACEMENT)

    def _holds_stop_prefix(self) -> bool:
        tail = self.text[-self.max_stop:] if self.max_stop else ""
        return any(tail.endswith(s[:k]) for s in self.stop_words for k in range(1, len(s)))

    def ready(self) -> Release | None:
        """A release of the text that is safe to send now (streaming), or None."""
        n = len(self.ids)
        if n == self.released:
            return None
        if self.stop_words:
            if self.clean != n or self._holds_stop_prefix():
                return None
        elif not self._is_clean(n):
            return None
        return self._release(n, 0)

    def final(self) -> Release:
        """Everything not yet sent (trimmed at a matched stop string)."""
        return self._release(len(self.ids), self.trim)

    def _release(self, n: int, trim: int) -> Release:
        p = self._window_start(self.ids, self.released)
        rel = Release(self.ids[p:n], self.released - p, trim, p)
        self.released = n
        self.released_chars = len(self.text)
        return rel

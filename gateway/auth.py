"""API keys: ``Authorization: Bearer <key>`` checked against a key file, in constant time.

The key file holds one key per line, either as is or as ``sha256:<hex>`` (the SHA-256 of the key, so
the file need not hold the secret). After the key, ``name=...`` and per-key limits may follow:

    # comments and blank lines are ignored
    sk-team-a-0123456789                      name=team-a max_concurrent=4 requests_per_s=2 burst=4
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08   name=ci

Only digests are kept in memory and compared (``hmac.compare_digest`` against every entry, no
early exit), and a key is only ever named by its ``name`` or the first 8 hex digits of its digest:
the key itself never reaches a log line or a metric label. The file is re-read when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .config import Limits

__all__ = ["KeyEntry", "KeyStore", "KeyFileError", "digest", "parse_key_file"]

ANONYMOUS = "anonymous"


class KeyFileError(ValueError):
    pass


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass
class KeyEntry:
    digest: bytes
    name: str
    limits: Dict[str, float] = field(default_factory=dict)  # per-key overrides of the config's limits


_LIMIT_KEYS = {"max_concurrent": int, "requests_per_s": float, "burst": int}


def parse_key_file(text: str, source: str = "key file") -> List[KeyEntry]:
    entries: List[KeyEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, *options = line.split()
        if token.startswith("sha256:"):
            hexd = token[len("sha256:"):]
            try:
                d = bytes.fromhex(hexd)
            except ValueError:
                d = b""
            if len(d) != 32:
                raise KeyFileError(f"{source} line {lineno}: sha256: must be followed by 64 hex digits")
        else:
            d = digest(token)
        name, limits = f"key-{d.hex()[:8]}", {}
        for opt in options:
            k, sep, v = opt.partition("=")
            if not sep:
                raise KeyFileError(f"{source} line {lineno}: expected name=value after the key, got {opt!r}")
            if k == "name":
                name = v
            elif k in _LIMIT_KEYS:
                try:
                    limits[k] = _LIMIT_KEYS[k](v)
                except ValueError:
                    raise KeyFileError(f"{source} line {lineno}: {k} must be a number, got {v!r}") from None
                if limits[k] <= 0:
                    raise KeyFileError(f"{source} line {lineno}: {k} must be > 0")
            else:
                raise KeyFileError(f"{source} line {lineno}: unknown option {k!r} "
                                   f"(name, {', '.join(_LIMIT_KEYS)})")
        entries.append(KeyEntry(d, name, limits))
    if not entries:
        raise KeyFileError(f"{source} holds no key")
    return entries


class KeyStore:
    """The keys of ``path`` (None: no authentication; every request is ``anonymous``)."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path else None
        self._entries: List[KeyEntry] = []
        self._stamp = None
        self._lock = threading.Lock()
        if self.path is not None:
            self._load()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _load(self) -> None:
        st = os.stat(self.path)
        self._entries = parse_key_file(self.path.read_text(), str(self.path))
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return  # keep the last good keys while the file is being replaced
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
            with self._lock:
                try:
                    self._load()
                except (OSError, KeyFileError):
                    pass  # a half-written file: keep the last good keys

    def check(self, authorization: Optional[str]) -> Optional[KeyEntry]:
        """The entry of the bearer key, or None (no or unknown key). Without a key file: an anonymous entry."""
        if self.path is None:
            return KeyEntry(b"", ANONYMOUS)
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        self._maybe_reload()
        d = digest(key)
        found = None
        for entry in self._entries:  # every entry is compared: the time does not say which one matched
            if hmac.compare_digest(entry.digest, d):
                found = entry
        return found

    def limits_for(self, entry: KeyEntry, defaults: Limits) -> Limits:
        if not entry.limits:
            return defaults
        return defaults.model_copy(update=entry.limits)

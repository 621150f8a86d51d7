"""The locked door of `tritonchat serve`: API keys on tritonserver's HTTP and gRPC endpoints.

Triton 2.51 can demand a header with an exact value before it serves a group of its APIs
(``--http-restricted-api=<groups>:<header>=<value>``, ``--grpc-restricted-protocol=<groups>:<key>=<value>``).
Each group takes exactly one header and one value, so each key is exactly one secret (no lists of keys).
Two keys, two groups of APIs:

* the **API key** (``--api-key-file``): inference (``infer``, ``generate``, ``generate_stream``, gRPC
  ``ModelInfer`` / ``ModelStreamInfer``) and the metadata and model-config reads that clients such as
  perf_analyzer and GenAI-Perf make first. Sent as ``authorization: Bearer <key>``.
* the **admin key** (``--admin-key-file``): model repository (index, load, unload), shared memory,
  statistics, trace and logging settings. Sent as ``admin-key: <key>``. Without ``--admin-key-file``
  (but with an API key) those APIs are locked with a random key that is never shown: closed to everyone.

Health (``/v2/health/live``, ``/v2/health/ready``, model ready) stays open: probes carry no key.

Triton prefixes gRPC metadata keys with ``triton-grpc-protocol-``: over gRPC the headers are
``triton-grpc-protocol-authorization`` and ``triton-grpc-protocol-admin-key`` (:func:`key_headers`).
Seen on this binary: a refused HTTP request gets 403 ``{"error":"This API is restricted, expecting header
'authorization'"}``, a refused gRPC call gets ``UNAVAILABLE`` with "This protocol is restricted, ...".

The keys reach tritonserver on its command line (its only way in): anyone who can read
``/proc/<pid>/cmdline`` of the server on that machine sees them (docs/operations.md). They are redacted from
everything tritonchat prints (:meth:`Access.redact`).
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ["INFERENCE_APIS", "ADMIN_APIS", "API_KEY_HEADER", "ADMIN_KEY_HEADER", "GRPC_HEADER_PREFIX",
           "MIN_KEY_LENGTH", "KeyFileError", "Access", "read_key_file", "check_key", "key_headers", "loose_permissions"]

# Triton 2.51's group names (its --help and the error for an unknown group list them: health, metadata,
# inference, shared-memory, model-config, model-repository, statistics, trace, logging)
INFERENCE_APIS = ("inference", "metadata", "model-config")
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")

API_KEY_HEADER = "authorization"  # value: "Bearer <key>" (Triton compares the whole value)
ADMIN_KEY_HEADER = "admin-key"  # value: the key itself
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # what Triton's gRPC frontend puts before the key name

MIN_KEY_LENGTH = 16

PathLike = Union[str, "os.PathLike[str]"]


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the problem."""


def check_key(key: str, what: str = "key") -> str:
    """`key` if it can be a header value on HTTP and gRPC and is long enough; else :class:`KeyFileError`."""
    if len(key) < MIN_KEY_LENGTH:
        raise KeyFileError(f"the {what} is {len(key)} characters long; use at least {MIN_KEY_LENGTH} "
                           "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    bad = sorted({c for c in key if not 0x21 <= ord(c) <= 0x7E})
    if bad:
        # gRPC metadata values and HTTP header values: visible ASCII; no spaces (they would be trimmed)
        raise KeyFileError(f"the {what} holds characters a header cannot carry ({', '.join(map(repr, bad))}); "
                           "use visible ASCII without spaces")
    return key


def read_key_file(path: PathLike, what: str = "key") -> str:
    """The one key in `path`: blank lines and lines starting with ``#`` are skipped, the key's line is
    stripped of surrounding whitespace. Exactly one key: Triton matches one value per API group."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"{what} file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read {what} file {p}: {exc}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise KeyFileError(f"{what} file {p} holds no key (one key on a line; '#' starts a comment line)")
    if len(keys) > 1:
        raise KeyFileError(f"{what} file {p} holds {len(keys)} keys; tritonserver accepts exactly one per "
                           "API group (rotate by replacing the key and restarting `tritonchat serve`)")
    try:
        return check_key(keys[0], what)
    except KeyFileError as exc:
        raise KeyFileError(f"{what} file {p}: {exc}") from None


def loose_permissions(path: PathLike) -> bool:
    """True when group or others may read the key file."""
    try:
        return bool(Path(path).expanduser().stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def key_headers(protocol: str, api_key: Optional[str] = None, admin_key: Optional[str] = None) -> Dict[str, str]:
    """The headers (HTTP) or metadata (gRPC) that carry the keys given."""
    prefix = GRPC_HEADER_PREFIX if protocol == "grpc" else ""
    out: Dict[str, str] = {}
    if api_key:
        out[prefix + API_KEY_HEADER] = f"Bearer {api_key}"
    if admin_key:
        out[prefix + ADMIN_KEY_HEADER] = admin_key
    return out


@dataclass(frozen=True)
class Access:
    """Who may call what: no keys (everything open), an API key, an admin key, or both."""

    api_key: Optional[str] = None
    admin_key: Optional[str] = None
    admin_key_generated: bool = False  # admin APIs locked with a key nobody was given

    @classmethod
    def from_files(cls, api_key_file: Optional[PathLike] = None,
                   admin_key_file: Optional[PathLike] = None) -> "Access":
        api_key = read_key_file(api_key_file, "API key") if api_key_file else None
        admin_key = read_key_file(admin_key_file, "admin key") if admin_key_file else None
        if api_key and admin_key and api_key == admin_key:
            raise KeyFileError(f"the admin key ({admin_key_file}) must differ from the API key ({api_key_file})")
        if api_key and not admin_key:
            return cls(api_key, secrets.token_urlsafe(32), admin_key_generated=True)
        return cls(api_key, admin_key)

    @property
    def locked(self) -> bool:
        return bool(self.api_key or self.admin_key)

    def server_args(self) -> List[str]:
        """tritonserver flags that put the API groups behind the keys (empty without keys)."""
        args: List[str] = []
        api_value = f"Bearer {self.api_key}" if self.api_key else None
        for groups, header, value in ((INFERENCE_APIS, API_KEY_HEADER, api_value),
                                      (ADMIN_APIS, ADMIN_KEY_HEADER, self.admin_key)):
            if value:
                spec = f"{','.join(groups)}:{header}={value}"
                args += [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]
        return args

    def admin_headers(self, protocol: str = "http") -> Dict[str, str]:
        """What the supervisor itself sends to the admin APIs (repository index)."""
        return key_headers(protocol, admin_key=self.admin_key)

    def redact(self, text: str) -> str:
        """`text` with every key replaced by a placeholder (command lines, passed-through server output)."""
        admin = "<random admin key>" if self.admin_key_generated else "<admin key>"
        for key, name in ((self.api_key, "<api key>"), (self.admin_key, admin)):
            if key:
                text = text.replace(key, name)
        return text

    def describe(self) -> str:
        """One line for the start banner (never the keys)."""
        if not self.locked:
            return "no keys: every API is open to whoever reaches the ports"
        inference = "API key (authorization: Bearer)" if self.api_key else "open"
        admin = ("closed (no --admin-key-file)" if self.admin_key_generated
                 else "admin key (admin-key header)" if self.admin_key else "open")
        return f"inference: {inference}; repository/shared-memory/statistics/trace/logging: {admin}; health: open"

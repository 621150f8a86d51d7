"""The response cache for deterministic requests (greedy, or a fixed seed).

Key = SHA-256 of: the Triton entry model's name, the *versions fingerprint* (the newest ready version
of every model Triton serves, read once per request: see upstream.py), the endpoint kind, the
canonical messages or prompt, and every generation parameter as sent to Triton. The rendered prompt
is not part of the key: the chat template is rendered inside Triton (preprocessing) as a pure
function of the messages and the model version, and both are in the key.

Value = the answer's pieces as they were streamed, its finish reason and token counts (JSON), so a
hit streams too. Only complete answers (finish ``stop`` or ``length``) are stored: never errors, and
never an answer whose client went away.

Backends: in-process LRU with TTL (default), or Redis (``redis://HOST:PORT/DB``): plain
``SET key value EX ttl`` (under ``allkeys-lru`` at maxmemory, Redis evicts for a plain SET, while a
MULTI/EXEC transaction is refused with "OOM command not allowed"). A Redis that is down or slow is a
miss (counted in ``tritonchat_gateway_cache_errors_total``), never a failed request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

__all__ = ["CachedAnswer", "ResponseCache", "MemoryCache", "RedisCache", "CacheError", "cache_key", "open_cache"]

log = logging.getLogger("tritonchat.gateway")
KEY_PREFIX = "tritonchat:gateway:v1:"


class CacheError(RuntimeError):
    pass


@dataclass
class CachedAnswer:
    pieces: List[str] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CachedAnswer":
        return cls(**json.loads(raw))


def cache_key(model: str, fingerprint: str, kind: str, canonical_input: str, params: dict) -> str:
    blob = json.dumps({"model": model, "versions": fingerprint, "kind": kind, "input": canonical_input,
                       "params": params}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    kind = "off"

    async def get(self, key: str) -> Optional[bytes]:
        return None

    async def put(self, key: str, value: bytes) -> None:
        return None

    async def close(self) -> None:
        return None

    def entries(self) -> Optional[int]:
        return None


class MemoryCache(ResponseCache):
    """LRU by entries and bytes, each entry living `ttl_s`."""

    kind = "memory"

    def __init__(self, ttl_s: float, max_entries: int, max_bytes: int, clock=time.monotonic):
        self.ttl_s, self.max_entries, self.max_bytes = ttl_s, max_entries, max_bytes
        self._clock = clock
        self._data: "OrderedDict[str, Tuple[float, bytes]]" = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> Optional[bytes]:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._data:
            self._drop(key)
        self._data[key] = (self._clock() + self.ttl_s, value)
        self._bytes += len(value)
        while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._data)))

    def _drop(self, key: str) -> None:
        _, value = self._data.pop(key)
        self._bytes -= len(value)

    def entries(self) -> Optional[int]:
        return len(self._data)


class RedisCache(ResponseCache):
    kind = "redis"

    def __init__(self, url: str, ttl_s: float, timeout_s: float = 0.5):
        import redis.asyncio as aioredis

        self.url = url
        self.ttl_s = max(1, int(round(ttl_s)))
        self._redis = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._checked = False

    async def _check_policy(self) -> None:
        self._checked = True
        try:
            policy = (await self._redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except Exception:  # noqa: BLE001 - CONFIG may be disabled; the policy is the operator's call
            return
        if policy not in ("allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "volatile-ttl"):
            log.warning("redis at %s has maxmemory-policy %s: at maxmemory it refuses writes instead of evicting "
                        "(run it with --maxmemory-policy allkeys-lru)", redact_url(self.url), policy)

    async def get(self, key: str) -> Optional[bytes]:
        try:
            if not self._checked:
                await self._check_policy()
            return await self._redis.get(KEY_PREFIX + key)
        except Exception as exc:  # noqa: BLE001
            raise CacheError(f"redis GET failed: {type(exc).__name__}: {exc}") from None

    async def put(self, key: str, value: bytes) -> None:
        try:
            await self._redis.set(KEY_PREFIX + key, value, ex=self.ttl_s)
        except Exception as exc:  # noqa: BLE001
            raise CacheError(f"redis SET failed: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:  # noqa: BLE001
            pass


def redact_url(url: str) -> str:
    """The URL without a password (redis://:secret@host -> redis://***@host)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def open_cache(spec: str, ttl_s: float, max_entries: int, max_bytes: int) -> ResponseCache:
    if spec == "off":
        return ResponseCache()
    if spec == "memory":
        return MemoryCache(ttl_s, max_entries, max_bytes)
    return RedisCache(spec, ttl_s)

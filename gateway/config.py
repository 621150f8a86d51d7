"""The gateway's settings (:class:`GatewayConfig`): where Triton is, where to listen, keys, limits, cache.

One object, filled from (lowest to highest priority) the defaults below, a YAML file
(``tritonchat gateway --config gateway.yaml``: the same keys, ``limits:`` nested) and command-line
options. ``tritonchat serve --openai-port`` builds the same object for the gateway it starts.

    triton_url: 127.0.0.1:8001        # Triton's gRPC endpoint (host:port)
    triton_api_key_file: null         # Triton's own keys, when `tritonchat serve` locks it (tritonchat/security.py)
    triton_admin_key_file: null       #   (the admin key lets the cache read the repository index)
    metrics_url: 127.0.0.1:8002       # Triton's metrics endpoint, relayed on /metrics (null: not relayed)
    host: 127.0.0.1
    port: 9000
    model: ensemble                   # the Triton entry model (docs/contract.md)
    served_model_names: []            # names clients may use for it (default: [model])
    api_key_file: null                # one key, or sha256:<hex of its SHA-256>, per line (null: no auth)
    limits: {max_concurrent: null, requests_per_s: null, burst: null}   # per key; null: no limit
    cache: memory                     # memory | off | redis://HOST:PORT/DB
    cache_ttl_s: 1800
    cache_max_entries: 4096           # memory cache only (Redis evicts by its own maxmemory, allkeys-lru)
    cache_max_bytes: 67108864
    max_body_bytes: 4194304           # larger request bodies: 413
    max_stop_sequences: 4             # OpenAI's limit
    default_max_tokens: null          # null: until the context ends (OpenAI's default)
    request_timeout_s: 600
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["GatewayConfig", "Limits", "load_config"]


class Limits(BaseModel):
    """Per-key limits. ``requests_per_s`` refills a token bucket of ``burst`` requests (default:
    ``max(1, requests_per_s)``); ``max_concurrent`` counts requests in flight (a stream counts until it ends)."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent: Optional[int] = Field(None, ge=1)
    requests_per_s: Optional[float] = Field(None, gt=0)
    burst: Optional[int] = Field(None, ge=1)

    def bucket_size(self) -> Optional[int]:
        if self.requests_per_s is None:
            return None
        return self.burst or max(1, int(self.requests_per_s))


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    triton_url: str = "127.0.0.1:8001"
    triton_api_key_file: Optional[Path] = None
    triton_admin_key_file: Optional[Path] = None
    metrics_url: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = Field(9000, ge=0, le=65535)
    model: str = "ensemble"
    served_model_names: List[str] = Field(default_factory=list)
    api_key_file: Optional[Path] = None
    limits: Limits = Field(default_factory=Limits)
    cache: str = "memory"
    cache_ttl_s: float = Field(1800.0, gt=0)
    cache_max_entries: int = Field(4096, ge=1)
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_chars: int = Field(256, ge=1)
    default_max_tokens: Optional[int] = Field(None, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    log_level: str = "info"
    access_log: bool = True

    @field_validator("cache")
    @classmethod
    def _cache_kind(cls, v: str) -> str:
        if v in ("memory", "off") or v.startswith(("redis://", "rediss://", "unix://")):
            return v
        raise ValueError(f"cache must be 'memory', 'off' or a redis:// URL, got {v!r}")

    @property
    def model_names(self) -> List[str]:
        """The names clients may send as ``model`` (the first is what /v1/models lists first)."""
        return list(dict.fromkeys(self.served_model_names or [self.model]))


def load_config(path: Optional[Path] = None, **overrides) -> GatewayConfig:
    """Defaults, then the YAML file at `path`, then the `overrides` that are not None."""
    data: dict = {}
    if path is not None:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a gateway config is a mapping of settings, got {type(loaded).__name__}")
        data.update(loaded)
    limits = dict(data.get("limits") or {})
    for key in ("max_concurrent", "requests_per_s", "burst"):
        if overrides.get(key) is not None:
            limits[key] = overrides.pop(key)
        overrides.pop(key, None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["limits"] = limits
    return GatewayConfig(**data)

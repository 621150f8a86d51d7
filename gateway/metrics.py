"""The gateway's own Prometheus metrics (one registry per app), served on ``/metrics`` followed by
Triton's (relayed), so one scrape sees both. Names start with ``tritonchat_gateway_``; Triton's and the
generator's (``nv_*``, ``tritonchat_*``) keep theirs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "tritonchat_gateway_"
        self.requests = Counter(p + "requests", "Answered requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge(p + "in_flight_requests", "Generation requests being answered", registry=r)
        self.latency = Histogram(p + "request_seconds", "Request received to last byte, by endpoint",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Request received to first text (streamed)",
                              buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "Generated tokens of answered requests",
                                         registry=r)
        self.disconnects = Counter(p + "client_disconnects", "Requests whose client went away before the end "
                                                             "(the Triton call was cancelled)", registry=r)
        self.limited = Counter(p + "rate_limited", "Requests refused with 429, by limit", ["limit"], registry=r)
        self.auth_failures = Counter(p + "auth_failures", "Requests refused with 401", registry=r)
        self.cache_hits = Counter(p + "cache_hits", "Deterministic requests answered from the cache", registry=r)
        self.cache_misses = Counter(p + "cache_misses", "Deterministic requests not in the cache", registry=r)
        self.cache_hit_bytes = Counter(p + "cache_hit_bytes", "Bytes of cached answers served", registry=r)
        self.cache_stored_bytes = Counter(p + "cache_stored_bytes", "Bytes of answers written to the cache",
                                          registry=r)
        self.cache_errors = Counter(p + "cache_errors", "Cache reads or writes that failed (served as a miss)",
                                    registry=r)
        self.cache_entries = Gauge(p + "cache_entries", "Entries in the in-process cache", registry=r)
        self.upstream_metrics_up = Gauge(p + "triton_metrics_up", "1 if Triton's metrics were relayed on the "
                                                                 "last scrape", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

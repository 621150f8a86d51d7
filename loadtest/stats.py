"""Small numeric helpers (percentiles, summaries) and Triton's statistics API."""

from __future__ import annotations

import json
import math
import urllib.request
from typing import Dict, Iterable, Optional, Sequence


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]; None for no values."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    pos = (len(vals) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def mean(values: Iterable[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pcts(values: Sequence[float], qs=(50, 90, 99)) -> Dict[str, Optional[float]]:
    """{"p50": ..., "p90": ..., "p99": ..., "mean": ...} of `values`."""
    out: Dict[str, Optional[float]] = {f"p{q}": percentile(values, q) for q in qs}
    out["mean"] = mean(values)
    return out


# ------------------------------------------------------------------------------ Triton statistics


def model_stats(model: str, http_url: Optional[str] = None, grpc_url: Optional[str] = None) -> Dict:
    """``GET /v2/models/<model>/stats`` (HTTP), or the same through gRPC; the model's first entry."""
    if http_url:
        url = http_url if http_url.startswith("http") else f"http://{http_url}"
        with urllib.request.urlopen(f"{url}/v2/models/{model}/stats", timeout=10) as resp:
            data = json.load(resp)
    elif grpc_url:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(grpc_url)
        try:
            data = client.get_inference_statistics(model, as_json=True)
        finally:
            client.close()
    else:
        raise ValueError("model_stats needs an HTTP or a gRPC url")
    entries = data.get("model_stats") or []
    return entries[0] if entries else {}


def to_int(x) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return 0


def batch_histogram(stats: Dict) -> Dict[int, int]:
    """batch size -> executions, from a statistics entry's ``batch_stats``."""
    out: Dict[int, int] = {}
    for b in stats.get("batch_stats") or []:
        out[to_int(b.get("batch_size"))] = to_int((b.get("compute_infer") or {}).get("count"))
    return out


def stats_delta(before: Dict, after: Dict) -> Dict:
    """What happened between two snapshots: requests, executions, average batch, batch histogram,
    and the mean queue / compute time per request (ms)."""
    inf = to_int(after.get("inference_count")) - to_int(before.get("inference_count"))
    exe = to_int(after.get("execution_count")) - to_int(before.get("execution_count"))
    hb, ha = batch_histogram(before), batch_histogram(after)
    hist = {k: ha.get(k, 0) - hb.get(k, 0) for k in sorted(set(ha) | set(hb))}
    hist = {k: v for k, v in hist.items() if v > 0}

    def per_request_ms(key: str) -> Optional[float]:
        a = (after.get("inference_stats") or {}).get(key) or {}
        b = (before.get("inference_stats") or {}).get(key) or {}
        n = to_int(a.get("count")) - to_int(b.get("count"))
        ns = to_int(a.get("ns")) - to_int(b.get("ns"))
        return ns / n / 1e6 if n > 0 else None

    return {"inference_count": inf, "execution_count": exe,
            "avg_batch": (inf / exe) if exe > 0 else None,
            "max_batch": max(hist) if hist else None,
            "batch_histogram": hist,
            "queue_ms": per_request_ms("queue"), "compute_infer_ms": per_request_ms("compute_infer")}


def fmt_hist(hist: Dict[int, int], limit: int = 8) -> str:
    items = sorted(hist.items(), key=lambda kv: -kv[1])[:limit]
    return " ".join(f"{k}×{v}" for k, v in sorted(items))

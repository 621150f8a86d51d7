"""Tables, markdown, JSON and plots for `tritonchat bench` results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

COLUMNS = ["source", "C", "reqs", "err", "out tok/s", "req/s", "TTFT p50", "TTFT p90", "TTFT p99",
           "ITL p50", "ITL p99", "e2e p50", "e2e p99", "server ÷ peer"]


def _f(x: Optional[float], digits: int = 1) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def add_ratios(result: Dict[str, Any]) -> None:
    """server tokens/s ÷ each peer's tokens/s, per concurrency (stored in result['ratios'])."""
    server = {lv["concurrency"]: lv for lv in result.get("server", {}).get("levels", [])}
    ratios: Dict[str, Dict[int, Optional[float]]] = {}
    for name, peer in (result.get("peers") or {}).items():
        if peer.get("skipped"):
            continue
        r: Dict[int, Optional[float]] = {}
        by_c = {lv["concurrency"]: lv for lv in peer.get("levels", [])}
        for c, s in server.items():
            # a sequential peer (applies_to_all) is the same reference at every concurrency
            lv = by_c.get(c) or (peer["levels"][0] if peer.get("applies_to_all") and peer.get("levels") else None)
            if lv and s.get("output_tokens_per_s") and lv.get("output_tokens_per_s"):
                r[c] = s["output_tokens_per_s"] / lv["output_tokens_per_s"]
        ratios[name] = r
    result["ratios"] = ratios


def rows(result: Dict[str, Any]) -> List[List[str]]:
    out: List[List[str]] = []
    ratios = result.get("ratios") or {}
    for lv in result.get("server", {}).get("levels", []):
        c = lv["concurrency"]
        rs = [f"{name} ×{r[c]:.2f}" for name, r in ratios.items() if r.get(c)]
        out.append(_row(f"tritonserver ({result.get('config', {}).get('protocol', 'grpc')})", lv, "; ".join(rs)))
    for name, peer in (result.get("peers") or {}).items():
        if peer.get("skipped"):
            out.append([name, "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "skipped (see below)"])
            continue
        for lv in peer.get("levels", []):
            out.append(_row(f"{name}" + (f" ({peer['mode']})" if peer.get("mode") else ""), lv, ""))
    return out


def _row(source: str, lv: Dict[str, Any], note: str) -> List[str]:
    ttft, itl, e2e = lv.get("ttft_ms") or {}, lv.get("itl_ms") or {}, lv.get("e2e_ms") or {}
    errs = str(lv.get("errors", 0)) + (" (capped)" if lv.get("time_capped") else "")
    return [source, str(lv["concurrency"]), str(lv.get("requests", "–")), errs, _f(lv.get("output_tokens_per_s")),
            _f(lv.get("requests_per_s"), 2), _f(ttft.get("p50")), _f(ttft.get("p90")), _f(ttft.get("p99")),
            _f(itl.get("p50"), 2), _f(itl.get("p99"), 2), _f(e2e.get("p50")), _f(e2e.get("p99")), note]


def title(result: Dict[str, Any]) -> str:
    cfg = result.get("config", {})
    label = result.get("label") or "model"
    how = "greedy"
    if cfg.get("temperature"):
        how = f"the server sampling at temperature {cfg['temperature']:g}" + "".join(
            f", {name} {cfg[key]:g}" for key, name in (("top_p", "top_p"), ("top_k", "top_k")) if cfg.get(key))
    if cfg.get("repetition_penalty"):
        how += f", the server's repetition penalty {cfg['repetition_penalty']:g}"
    if how != "greedy" and result.get("peers"):
        how += ", the peers greedy without penalties"
    return (f"{label}: prompt {cfg.get('prompt_len')} tokens, output {cfg.get('output_len')} tokens "
            f"(min_tokens = max_tokens, {how}); latencies in ms")


def skipped_notes(result: Dict[str, Any]) -> List[str]:
    return [f"{name} skipped: {peer['skipped']}" for name, peer in (result.get("peers") or {}).items()
            if peer.get("skipped")]


def rich_table(result: Dict[str, Any]):
    from rich.table import Table

    notes = skipped_notes(result)
    table = Table(title=title(result), show_lines=False, caption="\n".join(notes) or None,
                  caption_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("source", "server ÷ peer") else "right",
                         overflow="fold")
    for r in rows(result):
        table.add_row(*r)
    return table


def overhead_line(o: Dict[str, Any]) -> str:
    line = (f"streaming cost (same request, C=1, {o['repeats']} pairs, {o['tokens']} tokens): streamed e2e p50 "
            f"{o['streamed_e2e_ms_p50']:.1f} ms vs non-streamed {o['non_streamed_e2e_ms_p50']:.1f} ms -> "
            f"{o['overhead_ms_per_token']:.3f} ms per token (min-vs-min: {o['overhead_ms_per_token_min']:.3f} ms)")
    pp = o.get("postprocessing_ms_per_token")
    if pp:
        calls = o["postprocessing_calls_per_request"]
        line += (f"; server side, postprocessing: {calls['streamed']:.0f} calls per streamed request, "
                 f"{pp['streamed']:.3f} ms per token in the model (queue + compute; non-streamed "
                 f"{pp['non_streamed']:.3f})")
    return line


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"**{title(result)}**", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c in ("source", "server ÷ peer") else "---:" for c in COLUMNS) + "|"]
    for r in rows(result):
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    for note in skipped_notes(result):
        lines += ["", note]
    o = result.get("server", {}).get("streaming_overhead")
    if o:
        lines += ["", overhead_line(o)]
    stats = [(lv["concurrency"], lv["server_stats"]) for lv in result.get("server", {}).get("levels", [])
             if lv.get("server_stats")]
    if stats:
        lines += ["", "Server-side (Triton statistics, per level): "
                  + "; ".join(f"C={c}: postprocessing avg batch "
                              f"{_f((s.get('postprocessing') or {}).get('avg_batch'), 2)}" for c, s in stats)]
    return "\n".join(lines) + "\n"


def plot(result: Dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = [("tritonserver", result.get("server", {}).get("levels", []))]
    for name, peer in (result.get("peers") or {}).items():
        if not peer.get("skipped"):
            series.append((name, peer.get("levels", [])))
    panels = [("output tokens/s", lambda lv: lv.get("output_tokens_per_s")),
              ("TTFT p50 (ms)", lambda lv: (lv.get("ttft_ms") or {}).get("p50")),
              ("inter-token latency p50 (ms)", lambda lv: (lv.get("itl_ms") or {}).get("p50"))]
    for ax, (ylabel, get) in zip(axes, panels):
        for name, levels in series:
            pts = [(lv["concurrency"], get(lv)) for lv in levels if get(lv) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title(result), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save(result: Dict[str, Any], out: Path) -> List[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=str))
    paths[1].write_text(markdown(result))
    paths.append(plot(result, out / "bench.png"))
    return paths

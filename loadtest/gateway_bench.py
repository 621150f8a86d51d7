"""``tritonchat bench --gateway`` / ``--openai-url``: the gateway's cost, measured against direct gRPC in
the same run.

For each concurrency level, the same sweep as ``tritonchat bench`` (bench.py: greedy, exactly
``output_len`` tokens on prompts of exactly ``prompt_len`` tokens, streamed) runs twice back to back:
straight to Triton over gRPC (tritonchat.client), then through the gateway (``POST /v1/completions``,
loadtest/openai_client.py). With ``--rounds N`` the pair repeats N times, the order swapped every round
(so that neither side always runs on the machine the other warmed or heated), and each keeps its best
round; beside the best rounds, the paired figures: each round's gateway ÷ direct and TTFT p50 difference,
their median and range (on a shared machine the two sides drift together, so pairs see less noise).
The gateway the bench starts itself has its response cache off (the bench's repeated prompts would
otherwise be cache hits), and so does every request (``Cache-Control: no-store``).

Reported per level: output tokens/s (gateway ÷ direct), TTFT p50 and p99 (gateway − direct, ms).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .bench import BenchConfig, BenchError, _resolve_prompts, _sweep, best_of_rounds, machine_info

__all__ = ["run_gateway_compare", "compare_levels"]


def run_gateway_compare(cfg: BenchConfig, openai_url: Optional[str], start_gateway: bool,
                        openai_model: str = "ensemble") -> Dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tritonchat.python_backend.allocator import keep_freed_memory

    from .net import check_loopback

    console = Console(width=None if Console().is_terminal else 200)
    if start_gateway and not cfg.model_repository:
        raise BenchError("--gateway starts a gateway beside the tritonserver the bench starts: give --model-repository "
                         "(or --openai-url for a gateway that runs already)")
    if not start_gateway and not openai_url:
        raise BenchError("give --gateway (with --model-repository) or --openai-url")
    if not cfg.model_repository and not cfg.url:
        raise BenchError("give --url (Triton's gRPC endpoint) or --model-repository for the direct side")
    for u in (cfg.url, openai_url, cfg.http_url):
        if u:
            check_loopback(u)
    malloc_tuned = keep_freed_memory()
    prompt_info = _resolve_prompts(cfg, console)
    prompts = prompt_info["prompts"]
    server = gateway = None
    result: Dict[str, Any] = {
        "label": cfg.label, "config": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in dataclasses.asdict(cfg).items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {**machine_info(), "malloc_keeps_freed_memory": malloc_tuned},
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            if cfg.model_repository:
                from tritonchat.server import TritonServer

                server = TritonServer(cfg.model_repository).start()
                grpc_url, http_url, metrics_url = server.grpc_url, server.http_url, server.metrics_url
            else:
                grpc_url, http_url, metrics_url = cfg.url, cfg.http_url, None
            if start_gateway:
                from tritonchat.gateway import GatewayConfig
                from tritonchat.gateway.process import GatewayProcess

                gateway = GatewayProcess(GatewayConfig(triton_url=grpc_url, metrics_url=metrics_url, port=0,
                                                       cache="off", access_log=False, log_level="warning")).start()
                openai_url = gateway.base_url
            result["urls"] = {"grpc": grpc_url, "openai": openai_url}
            direct_cfg = dataclasses.replace(cfg, protocol="grpc")
            gw_cfg = dataclasses.replace(cfg, protocol="openai", model_name=openai_model)
            rounds: Dict[str, List[List[Dict[str, Any]]]] = {"direct": [], "gateway": []}
            n_rounds = max(1, int(cfg.rounds))
            for r in range(n_rounds):
                tag = f"[{r + 1}/{n_rounds}] " if n_rounds > 1 else ""
                for name in rounds:
                    rounds[name].append([])
                sides = (("direct", direct_cfg, grpc_url), ("gateway", gw_cfg, openai_url))
                for c in cfg.concurrency:  # the two sides back to back at each level: the same machine state
                    for name, side_cfg, url in (sides if r % 2 == 0 else sides[::-1]):
                        one = dataclasses.replace(side_cfg, concurrency=[c], overhead_repeats=0)
                        out = asyncio.run(_sweep(one, url, http_url, grpc_url, prompts, progress,
                                                 with_overhead=False, tag=f"{tag}{name:<8}"))
                        rounds[name][-1].extend(out["levels"])
            for name, per_round in rounds.items():
                result[name] = best_of_rounds([{"levels": levels} for levels in per_round])
    finally:
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop()
    result["overhead"] = compare_levels(result["direct"]["levels"], result["gateway"]["levels"])
    add_paired(result["overhead"], rounds)
    console.print(rich_table(result))
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gateway_compare.json").write_text(json.dumps(result, indent=2))
        (out / "gateway_compare.md").write_text(markdown(result))
        console.print(f"saved {out / 'gateway_compare.json'}, {out / 'gateway_compare.md'}")
    return result


def compare_levels(direct: List[Dict[str, Any]], gateway: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per concurrency: tokens/s of both, gateway ÷ direct, and TTFT p50 / p99 of both and their difference."""
    by_c = {lv["concurrency"]: lv for lv in gateway}
    out = []
    for d in direct:
        g = by_c.get(d["concurrency"])
        if g is None:
            continue
        row: Dict[str, Any] = {"concurrency": d["concurrency"], "errors": d["errors"] + g["errors"]}
        dt, gt = d.get("output_tokens_per_s"), g.get("output_tokens_per_s")
        row.update(direct_tok_s=dt, gateway_tok_s=gt, tok_s_ratio=(gt / dt) if dt and gt else None)
        for q in ("p50", "p99"):
            a, b = (d.get("ttft_ms") or {}).get(q), (g.get("ttft_ms") or {}).get(q)
            row[f"direct_ttft_{q}_ms"], row[f"gateway_ttft_{q}_ms"] = a, b
            row[f"ttft_{q}_delta_ms"] = (b - a) if a is not None and b is not None else None
        a, b = (d.get("itl_ms") or {}).get("p50"), (g.get("itl_ms") or {}).get("p50")
        row["direct_itl_p50_ms"], row["gateway_itl_p50_ms"] = a, b
        out.append(row)
    return out


def add_paired(rows: List[Dict[str, Any]], rounds: Dict[str, List[List[Dict[str, Any]]]]) -> None:
    """Per level, each round's gateway ÷ direct tokens/s and TTFT p50 difference: median, min, max."""
    import statistics

    for row in rows:
        ratios, deltas = [], []
        for d_levels, g_levels in zip(rounds["direct"], rounds["gateway"]):
            d = next((lv for lv in d_levels if lv["concurrency"] == row["concurrency"]), None)
            g = next((lv for lv in g_levels if lv["concurrency"] == row["concurrency"]), None)
            if not d or not g:
                continue
            if d.get("output_tokens_per_s") and g.get("output_tokens_per_s"):
                ratios.append(g["output_tokens_per_s"] / d["output_tokens_per_s"])
            a, b = (d.get("ttft_ms") or {}).get("p50"), (g.get("ttft_ms") or {}).get("p50")
            if a is not None and b is not None:
                deltas.append(b - a)
        row["paired_tok_s_ratios"], row["paired_ttft_p50_deltas_ms"] = ratios, deltas
        row["paired_tok_s_ratio_median"] = statistics.median(ratios) if ratios else None
        row["paired_ttft_p50_delta_median_ms"] = statistics.median(deltas) if deltas else None


HEAD = ["C", "direct tok/s", "gateway tok/s", "gateway ÷ direct", "TTFT p50 direct", "TTFT p50 gateway", "Δ p50",
        "TTFT p99 direct", "TTFT p99 gateway", "Δ p99", "ITL p50 direct", "ITL p50 gateway", "errors",
        "paired ÷ median [min–max]", "paired Δ p50 median [min–max]"]


def _cells(row: Dict[str, Any]) -> List[str]:
    def f(x, d=1):
        return "–" if x is None else f"{x:,.{d}f}"

    ratio = row["tok_s_ratio"]
    return [str(row["concurrency"]), f(row["direct_tok_s"]), f(row["gateway_tok_s"]),
            "–" if ratio is None else f"{ratio:.3f} ({(ratio - 1) * 100:+.1f} %)",
            f(row["direct_ttft_p50_ms"], 2), f(row["gateway_ttft_p50_ms"], 2), f(row["ttft_p50_delta_ms"], 2),
            f(row["direct_ttft_p99_ms"], 2), f(row["gateway_ttft_p99_ms"], 2), f(row["ttft_p99_delta_ms"], 2),
            f(row["direct_itl_p50_ms"], 2), f(row["gateway_itl_p50_ms"], 2), str(row["errors"]),
            _spread(row.get("paired_tok_s_ratio_median"), row.get("paired_tok_s_ratios"), 3),
            _spread(row.get("paired_ttft_p50_delta_median_ms"), row.get("paired_ttft_p50_deltas_ms"), 2)]


def _spread(median, values, d: int) -> str:
    if median is None or not values:
        return "–"
    return f"{median:.{d}f} [{min(values):.{d}f}–{max(values):.{d}f}]"


def _title(result: Dict[str, Any]) -> str:
    cfg = result["config"]
    return (f"gateway vs direct gRPC: prompt {cfg['prompt_len']} tokens, output {cfg['output_len']} tokens "
            f"(greedy, streamed, {cfg['rounds']} round(s), best kept); latencies in ms")


def rich_table(result: Dict[str, Any]):
    from rich.table import Table

    table = Table(title=_title(result))
    for h in HEAD:
        table.add_column(h, justify="left" if h == "C" else "right")
    for row in result["overhead"]:
        table.add_row(*_cells(row))
    return table


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"**{_title(result)}** ({result['started']}, {result['machine'].get('cpus')} CPUs)", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["overhead"]]
    return "\n".join(lines) + "\n"

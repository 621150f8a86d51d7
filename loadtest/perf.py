"""Run the ready perf_analyzer configurations (``loadtest/perf_analyzer/*.json``) against a server.

    tritonchat bench perf-analyzer --url 127.0.0.1:8001 [--http-url 127.0.0.1:8000]
    tritonchat bench perf-analyzer --model-repository repos/default      # starts and stops the server

Configurations (``--perf-config NAME``, repeatable; default: all three):

* ``ensemble_streaming``: the ensemble over gRPC streaming (``-i grpc --streaming``; the input data
  sends text_input / max_tokens / min_tokens / stream=true). The LLM figures are computed from
  perf_analyzer's ``--profile-export-file`` (every request's send time, every response's arrival
  time and outputs): time to first token, inter-token latency, output tokens/s, requests/s.
* ``preprocessing_batching`` / ``postprocessing_batching``: each stateless Python model alone at
  request concurrency 1 and 16. Triton's statistics API (``/v2/models/<m>/stats``), read before and
  after each run, gives executions vs requests: the average batch the dynamic batcher formed.

perf_analyzer is looked up as ``tritonchat doctor`` does (PATH, then ``<repo>/.tools/``; install it with
``tritonchat install-perf-analyzer``). Everything goes to loopback only.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .install_perf_analyzer import find_perf_analyzer
from .stats import fmt_hist, mean, model_stats, percentile, stats_delta

CONFIG_DIR = Path(__file__).resolve().parent / "perf_analyzer"
DEFAULT_CONFIGS = ("ensemble_streaming", "preprocessing_batching", "postprocessing_batching")


class PerfError(RuntimeError):
    pass


def load_config(name: str) -> Dict[str, Any]:
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json") if not p.stem.endswith("_input")))
        raise PerfError(f"no perf_analyzer configuration {name!r} (known: {known})")
    cfg = json.loads(path.read_text())
    cfg["name"] = path.stem
    cfg["input_data_path"] = str((path.parent / cfg["input_data"]).resolve())
    return cfg


def input_data_with_length(cfg: Dict[str, Any], output_len: Optional[int], workdir: Path) -> str:
    """The config's input data, with max_tokens = min_tokens = output_len where given."""
    src = Path(cfg["input_data_path"])
    if not output_len or cfg.get("report") != "llm":
        return str(src)
    data = json.loads(src.read_text())
    for entry in data.get("data", []):
        entry["max_tokens"] = [int(output_len)]
        entry["min_tokens"] = [int(output_len)]
    dst = workdir / f"{cfg['name']}_input_{output_len}.json"
    dst.write_text(json.dumps(data))
    return str(dst)


def _with_request_count(args: Sequence[str], requests: Optional[int]) -> List[str]:
    args = list(args)
    if not requests:
        return args
    if "--request-count" in args:
        args[args.index("--request-count") + 1] = str(int(requests))
    else:
        args += ["--request-count", str(int(requests))]
    return args


def command(pa: Path, cfg: Dict[str, Any], url: str, concurrency: int, input_data: str, export: Path,
            requests: Optional[int] = None) -> List[str]:
    cmd = [str(pa), "-m", cfg["model"], "-i", cfg.get("protocol", "grpc"), "-u", url,
           "--input-data", input_data, "--concurrency-range", str(concurrency),
           "--profile-export-file", str(export)]
    if cfg.get("streaming"):
        cmd.append("--streaming")
    return cmd + _with_request_count(cfg.get("args", []), requests)


# ------------------------------------------------------------------------------------ profile export


def llm_metrics(export: Dict[str, Any]) -> Dict[str, Any]:
    """TTFT, inter-token latency, output tokens/s from a perf_analyzer profile export (streaming)."""
    out: Dict[str, Any] = {}
    for exp in export.get("experiments", []):
        reqs = [r for r in exp.get("requests", []) if r.get("response_timestamps")]
        if not reqs:
            continue
        ttft, itl, e2e, tokens = [], [], [], []
        for r in reqs:
            t0, stamps = r["timestamp"], r["response_timestamps"]
            outs = r.get("response_outputs") or []
            counts = [_num_tokens(o) for o in outs] if len(outs) == len(stamps) else []
            ttft.append((stamps[0] - t0) / 1e6)
            e2e.append((stamps[-1] - t0) / 1e6)
            if counts and all(c is not None for c in counts):
                n = counts[-1]
                prev_count, prev_t = counts[0], stamps[0]
                for c, t in zip(counts[1:], stamps[1:]):
                    k = c - prev_count
                    if k > 0:
                        itl.extend([(t - prev_t) / 1e6 / k] * k)
                        prev_count, prev_t = c, t
            else:  # no outputs recorded: one token per response
                n = len(stamps)
                itl.extend((b - a) / 1e6 for a, b in zip(stamps, stamps[1:]))
            tokens.append(n)
        start = min(r["timestamp"] for r in reqs)
        end = max(r["response_timestamps"][-1] for r in reqs)
        wall = (end - start) / 1e9
        mode = exp.get("experiment", {})
        out[f"{mode.get('mode', 'concurrency')}={mode.get('value')}"] = {
            "requests": len(reqs), "output_tokens": sum(tokens), "tokens_per_request": mean(tokens),
            "output_tokens_per_s": sum(tokens) / wall if wall > 0 else None,
            "requests_per_s": len(reqs) / wall if wall > 0 else None,
            "ttft_ms": {q: percentile(ttft, int(q[1:])) for q in ("p50", "p90", "p99")},
            "itl_ms": {q: percentile(itl, int(q[1:])) for q in ("p50", "p90", "p99")},
            "e2e_ms": {q: percentile(e2e, int(q[1:])) for q in ("p50", "p90", "p99")},
        }
    return out


def _num_tokens(output: Dict[str, Any]) -> Optional[int]:
    v = output.get("num_output_tokens")
    if isinstance(v, list):
        v = v[0] if v else None
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------ the runner


def run_perf(url: str, http_url: Optional[str], configs: Sequence[str], out: Path, output_len: Optional[int] = None,
             concurrency: Optional[List[int]] = None, perf_analyzer: Optional[Path] = None,
             timeout: float = 300.0, console=None, requests: Optional[int] = None) -> Dict[str, Any]:
    from .net import check_loopback

    check_loopback(url)
    if http_url:
        check_loopback(http_url)
    pa = Path(perf_analyzer) if perf_analyzer else find_perf_analyzer()
    if pa is None:
        raise PerfError("perf_analyzer not found (on PATH or under .tools/): "
                        "tritonchat install-perf-analyzer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"perf_analyzer": str(pa), "url": url, "runs": []}
    for name in configs:
        cfg = load_config(name)
        data = input_data_with_length(cfg, output_len, out)
        for c in concurrency or cfg.get("concurrency", [1]):
            export = out / f"{cfg['name']}_c{c}.profile.json"
            export.unlink(missing_ok=True)  # perf_analyzer refuses an existing export path
            cmd = command(pa, cfg, url, c, data, export, requests)
            models = cfg.get("stats_models", [cfg["model"]])
            before = {m: model_stats(m, http_url=http_url, grpc_url=None if http_url else url) for m in models}
            _say(console, f"$ {' '.join(cmd)}")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise PerfError(f"perf_analyzer did not finish within {timeout:.0f} s: {' '.join(cmd)}") from None
            after = {m: model_stats(m, http_url=http_url, grpc_url=None if http_url else url) for m in models}
            (out / f"{cfg['name']}_c{c}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
                raise PerfError(f"perf_analyzer failed (exit {proc.returncode}) for {cfg['name']} C={c}:\n{tail}")
            run: Dict[str, Any] = {"config": cfg["name"], "model": cfg["model"], "concurrency": c,
                                   "command": cmd, "throughput_infer_per_s": _throughput(proc.stdout),
                                   "server_stats": {m: stats_delta(before[m], after[m]) for m in models}}
            if cfg.get("report") == "llm" and export.is_file():
                metrics = llm_metrics(json.loads(export.read_text()))
                run["llm"] = next(iter(metrics.values()), None)
            results["runs"].append(run)
    (out / "perf_summary.json").write_text(json.dumps(results, indent=2))
    (out / "perf_summary.md").write_text(markdown(results))
    return results


def _throughput(stdout: str) -> Optional[float]:
    for line in reversed(stdout.splitlines()):
        if "throughput:" in line and "infer/sec" in line:
            try:
                return float(line.split("throughput:")[1].split("infer/sec")[0])
            except ValueError:
                return None
    return None


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(f"[dim]{msg}[/]", highlight=False, soft_wrap=True)
    else:
        print(msg, flush=True)


def _f(x, d=1):
    return "–" if x is None else f"{x:.{d}f}"


def table_rows(results: Dict[str, Any]):
    llm, batching = [], []
    for run in results["runs"]:
        if run.get("llm"):
            m = run["llm"]
            llm.append([run["config"], str(run["concurrency"]), str(m["requests"]), _f(m["output_tokens_per_s"]),
                        _f(m["requests_per_s"], 2), _f(m["ttft_ms"]["p50"]), _f(m["ttft_ms"]["p99"]),
                        _f(m["itl_ms"]["p50"], 2), _f(m["itl_ms"]["p99"], 2), _f(m["e2e_ms"]["p50"])])
        for model, s in run["server_stats"].items():
            batching.append([run["config"], str(run["concurrency"]), model, str(s["inference_count"]),
                             str(s["execution_count"]), _f(s["avg_batch"], 2), str(s["max_batch"] or "–"),
                             fmt_hist(s["batch_histogram"]), _f(s["queue_ms"], 2), _f(s["compute_infer_ms"], 2)])
    return llm, batching


LLM_COLS = ["config", "C", "reqs", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
            "e2e p50 ms"]
BATCH_COLS = ["config", "C", "model", "requests", "executions", "avg batch", "max batch", "batch size×executions",
              "queue ms/req", "compute ms/req"]


def markdown(results: Dict[str, Any]) -> str:
    llm, batching = table_rows(results)
    lines = []
    for title, cols, rows in (("perf_analyzer: LLM figures (from the profile export)", LLM_COLS, llm),
                              ("Triton statistics during each run (dynamic batching)", BATCH_COLS, batching)):
        if not rows:
            continue
        lines += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return "\n".join(lines)


def print_tables(results: Dict[str, Any], console) -> None:
    from rich.table import Table

    llm, batching = table_rows(results)
    for title, cols, rows in (("perf_analyzer: LLM figures (from the profile export)", LLM_COLS, llm),
                              ("Triton statistics during each run (dynamic batching)", BATCH_COLS, batching)):
        if rows:
            t = Table(title=title)
            for c in cols:
                t.add_column(c, justify="left" if c in ("config", "model", "batch size×executions") else "right")
            for r in rows:
                t.add_row(*r)
            console.print(t)


def run_perf_command(url=None, http_url=None, model_repository=None, configs=None, concurrency=None,
                     output_len=None, out=None, perf_analyzer=None, timeout=300.0, requests=None) -> int:
    """`tritonchat bench perf-analyzer`: run, print and save; the exit status."""
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 200)
    if not url and not model_repository:
        console.print("[red]error:[/] give --url (a running server, gRPC) or --model-repository")
        return 2
    levels = [int(x) for x in str(concurrency).split(",") if x] if concurrency else None
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="tritonchat-perf-"))
    server = None
    try:
        if model_repository:
            from tritonchat.server import TritonServer

            console.print(f"starting tritonserver on {model_repository} ...")
            server = TritonServer(model_repository).start()
            url, http_url = server.grpc_url, server.http_url
        results = run_perf(url, http_url, configs or list(DEFAULT_CONFIGS), out, output_len, levels,
                           perf_analyzer, timeout, console, requests)
    except PerfError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        if server is not None:
            server.stop()
    print_tables(results, console)
    console.print(f"saved {out / 'perf_summary.json'}, {out / 'perf_summary.md'} (+ profile exports and logs)")
    return 0

"""What `tritonchat bench [sweep | perf-analyzer | locust]` runs: the mode's runner (sweep: bench.py; with
--gateway / --openai-url: gateway_bench.py, the gateway against direct gRPC; perf-analyzer: perf.py) and
locust's headless run. The command itself is in tritonchat/cli.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Optional

MODES = ("sweep", "perf-analyzer", "locust")


def run_bench_command(mode: str, *, url: Optional[str], model_repository: Optional[Path], http_url: Optional[str],
                      concurrency: Optional[str], prompt_len: int, output_len: int,
                      requests_per_level: Optional[int], out: Optional[Path], protocol: str, peers: Optional[str],
                      model: Optional[str], tokenizer: Optional[Path], max_seconds_per_level: float,
                      streaming_overhead: int, run_time: str, label: Optional[str], rounds: int = 1,
                      client_processes: int = 0, perf_configs: Optional[List[str]] = None,
                      perf_analyzer: Optional[Path] = None, perf_timeout: float = 300.0,
                      openai_url: Optional[str] = None, gateway: bool = False,
                      openai_model: str = "ensemble", peer_concurrency: Optional[str] = None,
                      temperature: float = 0.0, top_p: Optional[float] = None, top_k: Optional[int] = None,
                      repetition_penalty: Optional[float] = None) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    mode = (mode or "sweep").lower()
    if mode not in MODES:
        console.print(f"[red]error:[/] unknown bench mode {mode!r} (one of: {', '.join(MODES)})")
        return 2
    from .net import NotLoopback

    try:
        if mode == "perf-analyzer":
            from .perf import run_perf_command

            return run_perf_command(url=url, http_url=http_url, model_repository=model_repository,
                                    configs=perf_configs, concurrency=concurrency, output_len=output_len, out=out,
                                    perf_analyzer=perf_analyzer, timeout=perf_timeout, requests=requests_per_level)
        if mode == "locust":
            return run_locust(url, http_url, model_repository, protocol, concurrency, output_len,
                              requests_per_level, out, run_time, console)
        from .bench import BenchConfig, BenchError, parse_levels, run_bench
        from .peers import normalize_peers

        cfg = BenchConfig(url=url, model_repository=model_repository, http_url=http_url, protocol=protocol,
                          concurrency=parse_levels(concurrency or "1,4,16,64"), prompt_len=prompt_len,
                          output_len=output_len, requests_per_level=requests_per_level, out=out,
                          peers=normalize_peers(peers.split(",")) if peers else [], model=model,
                          tokenizer=tokenizer, max_seconds_per_level=max_seconds_per_level,
                          overhead_repeats=streaming_overhead, label=label, rounds=rounds,
                          client_processes=client_processes,
                          peer_concurrency=parse_levels(peer_concurrency) if peer_concurrency else None,
                          temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty)
        if protocol == "openai" and model_repository:
            raise ValueError("--protocol openai sweeps a running gateway (--url); to start one beside the "
                             "server, use --gateway")
        try:
            if openai_url or gateway:  # gateway vs direct gRPC, the same run
                from .gateway_bench import run_gateway_compare

                result = run_gateway_compare(cfg, openai_url, gateway, openai_model)
                return 1 if any(row["errors"] for row in result["overhead"]) else 0
            if protocol == "openai":
                cfg.model_name = openai_model
            result = run_bench(cfg)
        except BenchError as exc:
            console.print(f"[red]error:[/] {exc}")
            return 1
        failed = sum(lv["errors"] for lv in result["server"]["levels"])
        return 1 if failed else 0
    except (NotLoopback, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2


def run_locust(url, http_url, model_repository, protocol, concurrency, output_len, requests_per_level, out,
               run_time, console) -> int:
    """Headless locust with the chosen protocol's user, bounded by -u, --run-time and requests per user."""
    from .net import check_loopback

    users = max(int(x) for x in (concurrency or "4").split(",") if x)
    server = None
    try:
        if model_repository:
            from tritonchat.server import TritonServer

            server = TritonServer(model_repository).start()
            grpc_url, http = server.grpc_url, server.http_url
        else:
            grpc_url = url if protocol == "grpc" else "127.0.0.1:8001"
            http = http_url or (url if protocol == "http" else "127.0.0.1:8000")
        check_loopback(grpc_url)
        check_loopback(http)
        out = Path(out or "bench-results/locust")
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
               "--host", f"http://{http}", "--grpc-host", grpc_url, "-u", str(users), "-r", str(users),
               "--run-time", run_time, "--max-requests-per-user", str(requests_per_level or 20),
               "--max-tokens", str(output_len), "--csv", str(out / "locust"), "--only-summary",
               "GrpcStreamUser" if protocol == "grpc" else "HttpStreamUser"]
        console.print("$ " + " ".join(cmd), highlight=False)
        rc = subprocess.call(cmd)
        console.print(f"locust CSV: {out / 'locust'}_stats.csv")
        return rc
    finally:
        if server is not None:
            server.stop()

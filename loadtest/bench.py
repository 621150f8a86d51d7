"""`tritonchat bench`: a concurrency sweep against the ensemble, with peers in the same run.

For each concurrency level C, C workers send streamed requests (asyncio client, gRPC or HTTP) until
``requests_per_level`` have finished. Every request asks for exactly ``output_len`` tokens
(``min_tokens = max_tokens``; greedy unless ``--temperature``) on a prompt of exactly ``prompt_len`` tokens (cut from real
text with the repository's tokenizer), so runs compare. Measured on the client:

* TTFT: request sent -> first delta carrying output ids;
* ITL (inter-token latency): the gap before each later delta, divided by the tokens it carries
  (one per delta, except where the server holds back an incomplete UTF-8 character);
* end-to-end latency: request sent -> last response;
* output tokens/s and requests/s: over the level's wall time (first request sent -> last answer).

One Python client process handles about 32 streams before it delays them itself (measured: docs/benchmarks-gpu.md,
"the benchmark client in several processes"), so a level of C streams runs in ``client_processes`` processes
(auto: ceil(C / 32), at most a quarter of the cores), each with its own event loop and connection, started
together by a barrier; their records are merged.

Peers run the same prompts on the same model without a server (``loadtest/peers.py``): transformers
``generate`` batched at the same concurrency, and llama.cpp (llama-cpp-python) where installed.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import queue as queue_mod
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from tritonchat.python_backend.manifest import read_manifest

from .stats import mean, model_stats, pcts, percentile, stats_delta, to_int

DEFAULT_CONCURRENCY = (1, 4, 16, 64)


class BenchError(RuntimeError):
    pass


@dataclass
class BenchConfig:
    url: Optional[str] = None  # host:port of the chosen protocol (a running server)
    model_repository: Optional[Path] = None  # start tritonserver on it (and stop it afterwards)
    http_url: Optional[str] = None  # for the statistics API (defaults: the server's, or --url with http)
    protocol: str = "grpc"  # grpc | http (Triton) | openai (the gateway: loadtest/openai_client.py)
    concurrency: List[int] = field(default_factory=lambda: list(DEFAULT_CONCURRENCY))
    prompt_len: int = 32
    output_len: int = 128
    requests_per_level: Optional[int] = None  # default: max(2 * C, 8)
    max_seconds_per_level: float = 300.0  # no new requests after this (the level is then marked "time-capped")
    out: Optional[Path] = None
    peers: List[str] = field(default_factory=list)
    model: Optional[str] = None  # HF folder for the peers (default: the repository's manifest "model")
    tokenizer: Optional[Path] = None  # default: REPO/preprocessing/1/tokenizer, else --model
    model_name: str = "ensemble"
    warmup: int = 2
    overhead_repeats: int = 0  # > 0: also measure streamed vs non-streamed e2e (same request), C = 1
    timeout: float = 120.0  # seconds one request may take; a request past it stops the run (server stuck)
    label: Optional[str] = None
    rounds: int = 1  # > 1: server sweep and peers alternate; each (source, C) keeps its best round
    client_processes: int = 0  # client processes per level; 0: auto (see `client_processes_for`)
    peer_concurrency: Optional[List[int]] = None  # the levels the batch peers run (default: the sweep's)
    # the server's requests sample with these (unseeded; 0 / None: greedy, the default); the peers stay greedy
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None  # the server's requests (greedy or sampled); the peers: none

    def peer_levels(self) -> List[int]:
        return list(self.peer_concurrency or self.concurrency)

    def requests_for(self, c: int) -> int:
        return int(self.requests_per_level) if self.requests_per_level else max(2 * c, 8)

    def client_processes_for(self, c: int) -> int:
        """Client processes for a level of `c` streams: the setting, or ceil(c / 32) capped at a
        quarter of the cores (one process does about 32 streams without delaying them itself)."""
        p = self.client_processes or min(math.ceil(c / 32), max(1, (os.cpu_count() or 1) // 4))
        return max(1, min(int(p), c))


@dataclass
class RequestRecord:
    start: float
    end: float = 0.0
    first: Optional[float] = None
    tokens: int = 0
    prompt_tokens: Optional[int] = None
    gaps: List[float] = field(default_factory=list)  # seconds per token after the first delta
    finish_reason: Optional[str] = None
    error: Optional[str] = None


# -------------------------------------------------------------------------------------------- requests


class Stalled(BenchError):
    """A request got no answer in time: the server is stuck (e.g. a crashed Python backend stub)."""


async def one_request(client, prompt: str, params, stream: bool = True,
                      timeout: Optional[float] = None) -> RequestRecord:
    """One request, timed; ``timeout`` (s): give up and record a TimeoutError (the stream is cancelled)."""
    rec = RequestRecord(start=time.perf_counter())
    try:
        await asyncio.wait_for(_fill(rec, client, prompt, params, stream), timeout)
    except asyncio.TimeoutError:
        rec.error = f"TimeoutError: no answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - every failure is a counted error, not a crash
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.end = time.perf_counter()
    return rec


async def _fill(rec: RequestRecord, client, prompt: str, params, stream: bool) -> None:
    if stream:
        prev = None
        s = client.stream(prompt, params)
        async with s:
            async for d in s:
                now = time.perf_counter()
                k = len(d.output_ids)
                if d.num_input_tokens is not None:
                    rec.prompt_tokens = d.num_input_tokens
                if d.finish_reason:
                    rec.finish_reason = d.finish_reason
                if k == 0:
                    continue
                if rec.first is None:
                    rec.first = now
                elif prev is not None:
                    rec.gaps.extend([(now - prev) / k] * k)
                prev = now
                rec.tokens += k
            comp = s.completion
        if comp.num_output_tokens:
            rec.tokens = comp.num_output_tokens
    else:
        comp = await client.generate(prompt, params)
        rec.first = time.perf_counter()
        rec.tokens = comp.num_output_tokens or len(comp.output_ids)
        rec.prompt_tokens = comp.num_input_tokens
        rec.finish_reason = comp.finish_reason


async def run_level(client, prompts: List[str], params, concurrency: int, n_requests: int,
                    max_seconds: float, on_done: Callable[[RequestRecord], None],
                    timeout: Optional[float] = None) -> Dict[str, Any]:
    counter = iter(range(n_requests))
    records: List[RequestRecord] = []
    t0 = time.perf_counter()
    capped = stalled = False

    async def worker(w: int) -> None:
        nonlocal capped, stalled
        for i in counter:
            if stalled:
                return
            if time.perf_counter() - t0 > max_seconds:
                capped = True
                return
            rec = await one_request(client, prompts[(i + w) % len(prompts)], params, timeout=timeout)
            records.append(rec)
            on_done(rec)
            if rec.error and rec.error.startswith("TimeoutError"):
                stalled = True  # no point queueing more behind a stuck server

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    level = summarize(records, concurrency, capped)
    level["stalled"] = stalled
    return level


def _split(total: int, parts: int) -> List[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _level_process(url: str, protocol: str, model_name: str, timeout: float, prompts: List[str], params,
                   workers: int, n_requests: int, offset: int, max_seconds: float, barrier, out) -> None:
    """One client process of a level (see `run_level_processes`): records go to `out` as they finish,
    then ("done", capped, stalled); a failure before the start goes as ("error", message)."""
    from .openai_client import make_client

    async def main() -> None:
        async with make_client(url, protocol, model_name, timeout) as client:
            await client.wait_ready(timeout=60)  # the connection is up before the clock starts
            await asyncio.to_thread(barrier.wait, 120)
            rotated = prompts[offset % len(prompts):] + prompts[:offset % len(prompts)]
            level = await run_level(client, rotated, params, workers, n_requests, max_seconds, out.put, timeout)
            out.put(("done", level["time_capped"], level["stalled"]))

    try:
        asyncio.run(main())
    except BaseException as exc:  # noqa: BLE001 - the parent must hear of it, not wait forever
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def run_level_processes(url: str, cfg: "BenchConfig", prompts: List[str], params, concurrency: int,
                        n_requests: int, processes: int, on_done: Callable[[RequestRecord], None]) -> Dict[str, Any]:
    """A level of `concurrency` streams in `processes` client processes that start together; the same
    summary as `run_level` over all their records (times are `time.perf_counter`, CLOCK_MONOTONIC:
    one clock for every process of the machine)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(processes)
    procs = []
    for i, (w, n) in enumerate(zip(_split(concurrency, processes), _split(n_requests, processes))):
        p = ctx.Process(target=_level_process, daemon=True,
                        args=(url, cfg.protocol, cfg.model_name, cfg.timeout, prompts, params, w, n,
                              i * 7919, cfg.max_seconds_per_level, barrier, out))
        p.start()
        procs.append(p)
    records: List[RequestRecord] = []
    done = capped = stalled = 0
    try:
        while done < processes:
            try:
                msg = out.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    raise BenchError("a bench client process died without a word (see its output above)")
                continue
            if isinstance(msg, RequestRecord):
                records.append(msg)
                on_done(msg)
            elif msg[0] == "done":
                done += 1
                capped |= msg[1]
                stalled |= msg[2]
            else:
                raise BenchError(f"bench client process failed: {msg[1]}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    level = summarize(records, concurrency, bool(capped))
    level["stalled"] = bool(stalled)
    return level


def summarize(records: List[RequestRecord], concurrency: int, capped: bool = False) -> Dict[str, Any]:
    ok = [r for r in records if r.error is None]
    errors = [r.error for r in records if r.error is not None]
    wall = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    tokens = sum(r.tokens for r in ok)
    ttft = [(r.first - r.start) * 1e3 for r in ok if r.first is not None]
    e2e = [(r.end - r.start) * 1e3 for r in ok]
    gaps = [g * 1e3 for r in ok for g in r.gaps]
    per_req_itl = [((r.end - r.first) * 1e3 / (r.tokens - 1)) for r in ok if r.first is not None and r.tokens > 1]
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "time_capped": capped,
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_request": (tokens / len(ok)) if ok else None,
        "prompt_tokens": mean(r.prompt_tokens for r in ok if r.prompt_tokens is not None),
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_ms": pcts(ttft),
        "itl_ms": {**pcts(gaps), "per_request_mean": mean(per_req_itl)},
        "e2e_ms": pcts(e2e),
    }


# -------------------------------------------------------------------------------------------- the sweep


def _params(cfg: BenchConfig):
    from tritonchat.client import GenerationParams

    return GenerationParams(max_tokens=cfg.output_len, min_tokens=cfg.output_len, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)


def _stats_snapshot(http_url: Optional[str], grpc_url: Optional[str],
                    models=("preprocessing", "generator", "postprocessing")):
    try:
        return {m: model_stats(m, http_url=http_url, grpc_url=grpc_url) for m in models}
    except Exception:  # noqa: BLE001 - statistics are a bonus
        return None


def _best(levels_per_round: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Per concurrency, the round with the highest output tokens/s (the others' figures kept in 'rounds')."""
    by_c: Dict[int, List[Dict[str, Any]]] = {}
    for levels in levels_per_round:
        for lv in levels:
            by_c.setdefault(lv["concurrency"], []).append(lv)
    out = []
    for c, cands in by_c.items():
        best = dict(max(cands, key=lambda lv: lv.get("output_tokens_per_s") or 0.0))
        if len(cands) > 1:
            best["rounds_output_tokens_per_s"] = [lv.get("output_tokens_per_s") for lv in cands]
        out.append(best)
    return out


def best_of_rounds(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    merged = dict(rounds[-1])
    merged["levels"] = _best([r["levels"] for r in rounds])
    merged["rounds"] = len(rounds)
    return merged


def best_of_peer_rounds(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    merged: Dict[str, Any] = {}
    for name in rounds[-1]:
        runs = [r[name] for r in rounds if name in r]
        ok = [p for p in runs if not p.get("skipped")]
        if not ok:
            merged[name] = runs[-1]
            continue
        merged[name] = dict(ok[-1], levels=_best([p["levels"] for p in ok]), rounds=len(ok))
    return merged


async def _sweep(cfg: BenchConfig, url: str, http_url: Optional[str], grpc_url: Optional[str],
                 prompts: List[str], progress, with_overhead: bool = True, tag: str = "") -> Dict[str, Any]:
    from .openai_client import make_client

    params = _params(cfg)
    levels: List[Dict[str, Any]] = []
    overhead = None
    async with make_client(url, cfg.protocol, cfg.model_name, cfg.timeout) as client:
        await client.wait_ready(timeout=60)
        for i in range(cfg.warmup):  # first requests load kernels, caches, the tokenizer...
            rec = await one_request(client, prompts[i % len(prompts)], params, timeout=cfg.timeout)
            if rec.error:
                raise BenchError(f"warm-up request failed: {rec.error}")
            if rec.tokens != cfg.output_len:
                progress.console.print(f"[yellow]warning:[/] asked for {cfg.output_len} tokens, got {rec.tokens} "
                                       f"(finish_reason {rec.finish_reason})")
        for c in cfg.concurrency:
            n = cfg.requests_for(c)
            task = progress.add_task(f"{tag}server  C={c:<3}", total=n)
            before = _stats_snapshot(http_url, grpc_url)
            procs = cfg.client_processes_for(c)
            if procs > 1:
                level = await asyncio.to_thread(run_level_processes, url, cfg, prompts, params, c, n, procs,
                                                lambda _r, t=task: progress.advance(t))
            else:
                level = await run_level(client, prompts, params, c, n, cfg.max_seconds_per_level,
                                        lambda _r, t=task: progress.advance(t), timeout=cfg.timeout)
            level["client_processes"] = procs
            after = _stats_snapshot(http_url, grpc_url)
            if before and after:
                level["server_stats"] = {m: stats_delta(before[m], after[m]) for m in before}
            progress.update(task, completed=n)
            levels.append(level)
            if level["stalled"]:
                raise Stalled(f"requests at concurrency {c} got no answer within {cfg.timeout:g} s: the server is "
                              "stuck (a crashed Python backend stub is one cause; see the server log). "
                              f"Finished levels: {[lv['concurrency'] for lv in levels[:-1]]}")
        if cfg.overhead_repeats > 0 and with_overhead:
            def post_stats():
                return (_stats_snapshot(http_url, grpc_url, ("postprocessing",)) or {}).get("postprocessing")

            overhead = await streaming_overhead(client, prompts[0], params, cfg.overhead_repeats, progress,
                                                post_stats if (http_url or grpc_url) else None, cfg.timeout)
    return {"levels": levels, "streaming_overhead": overhead}


async def streaming_overhead(client, prompt: str, params, repeats: int, progress,
                             stats_fn: Optional[Callable[[], Optional[Dict]]] = None,
                             timeout: Optional[float] = None) -> Dict[str, Any]:
    """The same request (greedy, fixed length), alternately streamed and not, one at a time.

    (median streamed e2e - median non-streamed e2e) / tokens = what streaming costs per token end to end:
    one response's text (made by the generator, or a postprocessing call with `detokenize:
    postprocessing`), one response on the wire and one client-side parse per token, minus nothing
    else (the engine does identical work in both).
    """
    task = progress.add_task("streamed vs not", total=2 * repeats)
    streamed, whole = [], []
    tokens = params.max_tokens
    # server side, per mode: postprocessing calls and their time in Triton (queue + compute), from
    # the statistics API read around each request (outside the timed part)
    post = {True: [0, 0, 0], False: [0, 0, 0]}  # calls, ns in the model (success), ns computing
    for _ in range(repeats):
        for stream, bucket in ((True, streamed), (False, whole)):
            before = stats_fn() if stats_fn else None
            rec = await one_request(client, prompt, params, stream=stream, timeout=timeout)
            after = stats_fn() if stats_fn else None
            if rec.error:
                raise BenchError(f"overhead request failed: {rec.error}")
            bucket.append((rec.end - rec.start) * 1e3)
            tokens = rec.tokens or tokens
            if before and after:
                d = _ns_delta(before, after)
                post[stream] = [a + b for a, b in zip(post[stream], d)]
            progress.advance(task)
    s50, w50 = percentile(streamed, 50), percentile(whole, 50)
    out = {"repeats": repeats, "tokens": tokens, "streamed_e2e_ms_p50": s50, "non_streamed_e2e_ms_p50": w50,
           "streamed_e2e_ms_min": min(streamed), "non_streamed_e2e_ms_min": min(whole),
           "overhead_ms_per_token": (s50 - w50) / tokens if tokens else None,
           "overhead_ms_per_token_min": (min(streamed) - min(whole)) / tokens if tokens else None}
    if stats_fn and post[True][0]:
        n_tok = tokens * repeats
        out["postprocessing_calls_per_request"] = {"streamed": post[True][0] / repeats,
                                                   "non_streamed": post[False][0] / repeats}
        out["postprocessing_ms_per_token"] = {  # time requests spent in postprocessing (queue + compute)
            "streamed": post[True][1] / 1e6 / n_tok, "non_streamed": post[False][1] / 1e6 / n_tok}
        out["postprocessing_compute_ms_per_token"] = {
            "streamed": post[True][2] / 1e6 / n_tok, "non_streamed": post[False][2] / 1e6 / n_tok}
    return out


def _ns_delta(before: Dict, after: Dict):
    def get(st, *keys):
        for k in keys:
            st = (st or {}).get(k) or {}
        return st

    calls = to_int(after.get("inference_count")) - to_int(before.get("inference_count"))
    success = to_int(get(after, "inference_stats", "success").get("ns")) - to_int(
        get(before, "inference_stats", "success").get("ns"))
    compute = sum(to_int(get(after, "inference_stats", k).get("ns"))
                  - to_int(get(before, "inference_stats", k).get("ns"))
                  for k in ("compute_input", "compute_infer", "compute_output"))
    return [calls, success, compute]


def _resolve_prompts(cfg: BenchConfig, console) -> Dict[str, Any]:
    from .prompts import approximate_prompts, build_prompts, load_tokenizer, tokenizer_dir_for

    tok_dir = cfg.tokenizer or tokenizer_dir_for(cfg.model_repository)
    if tok_dir is None and cfg.model and Path(cfg.model).is_dir():
        tok_dir = Path(cfg.model)
    count = max(16, min(64, max(cfg.concurrency)))
    if tok_dir is None:
        console.print("[yellow]no tokenizer (give --model-repository, --tokenizer or --model): prompts are "
                      "approximately --prompt-len tokens; the real length is read back from the server[/]")
        return {"prompts": approximate_prompts(cfg.prompt_len, count), "tokenizer": None}
    tok = load_tokenizer(Path(tok_dir))
    return {"prompts": build_prompts(tok, cfg.prompt_len, count), "tokenizer": str(tok_dir), "tok": tok}


def peer_model_dir(cfg: BenchConfig) -> Optional[Path]:
    if cfg.model:
        return Path(cfg.model)
    model = read_manifest(cfg.model_repository).get("model")
    if model and Path(model).is_dir():
        return Path(model)
    return None


def run_bench(cfg: BenchConfig) -> Dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import report

    console = Console(width=None if Console().is_terminal else 200)
    if not cfg.url and not cfg.model_repository:
        raise BenchError("give --url (a running server) or --model-repository (started here)")
    bad = [c for c in cfg.concurrency if c < 1]
    if bad:
        raise BenchError(f"concurrency levels must be >= 1, got {bad}")
    if cfg.output_len < 1:
        raise BenchError("--output-len must be >= 1")
    from .net import check_loopback

    if cfg.url:
        check_loopback(cfg.url)
    if cfg.http_url:
        check_loopback(cfg.http_url)
    from tritonchat.python_backend.allocator import keep_freed_memory

    # the same malloc settings as the server's model processes, for this process's client and peers:
    # `generate` allocates and frees as much per step as our engine does (see allocator.py)
    malloc_tuned = keep_freed_memory()
    prompt_info = _resolve_prompts(cfg, console)
    prompts = prompt_info["prompts"]
    manifest = read_manifest(cfg.model_repository)
    result: Dict[str, Any] = {
        "label": cfg.label or (Path(manifest["model"]).name if manifest.get("model") else None)
        or (Path(cfg.model).name if cfg.model else None),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "model_repository": manifest and {k: manifest.get(k) for k in ("model", "architecture", "engine", "precision",
                                                                        "max_seq_len", "max_batch_size")},
        "tokenizer": prompt_info["tokenizer"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {**machine_info(), "malloc_keeps_freed_memory": malloc_tuned},
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    server = None
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            if cfg.model_repository:
                from tritonchat.server import TritonServer

                t = progress.add_task(f"starting tritonserver on {cfg.model_repository}", total=None)
                server = TritonServer(cfg.model_repository).start()
                progress.update(t, total=1, completed=1)
                url = server.grpc_url if cfg.protocol == "grpc" else server.http_url
                http_url, grpc_url = cfg.http_url or server.http_url, server.grpc_url
            else:
                url = cfg.url
                http_url = cfg.http_url or (url if cfg.protocol == "http" else None)
                grpc_url = url if cfg.protocol == "grpc" else None
            result["url"] = url
            rounds = max(1, int(cfg.rounds))
            server_rounds, peer_rounds = [], []
            peer_dir = peer_model_dir(cfg) if cfg.peers else None
            for r in range(rounds):
                last = r == rounds - 1
                tag = f"[{r + 1}/{rounds}] " if rounds > 1 else ""
                server_rounds.append(asyncio.run(_sweep(cfg, url, http_url, grpc_url, prompts, progress,
                                                        with_overhead=last, tag=tag)))
                if last and server is not None:  # the last peers run on a machine without the server
                    server.stop()
                    server = None
                if cfg.peers:
                    from .peers import run_peers

                    peer_rounds.append(run_peers(cfg, peer_dir, prompts, progress, console, tag=tag, sweep=_sweep))
            result["server"] = best_of_rounds(server_rounds)
            if cfg.peers:
                result["peers"] = best_of_peer_rounds(peer_rounds)
    finally:
        if server is not None:
            server.stop()
    report.add_ratios(result)
    console.print(report.rich_table(result))
    if result["server"].get("streaming_overhead"):
        console.print(report.overhead_line(result["server"]["streaming_overhead"]))
    if cfg.out:
        paths = report.save(result, Path(cfg.out))
        console.print("saved " + ", ".join(str(p) for p in paths))
    return result


def machine_info() -> Dict[str, Any]:
    import os
    import platform

    info: Dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def parse_levels(text: str) -> List[int]:
    try:
        levels = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise BenchError(f"--concurrency takes a comma-separated list of integers, got {text!r}") from None
    if not levels:
        raise BenchError("--concurrency is empty")
    return levels


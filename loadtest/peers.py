"""Peers of `tritonchat bench`: the same prompts and lengths on the same model, without a server.

* ``transformers``: ``model.generate`` on a batch of C prompts (left padding, greedy,
  ``min_new_tokens = max_new_tokens = output_len``) at each concurrency C, on the device the
  repository's generator runs on. This is the best a plain script does without a server: one static
  batch, every sequence the same length. TTFT is a separate ``generate(max_new_tokens=1)`` of the
  same batch; ITL = (batch time - TTFT) / (output_len - 1).
* ``transformers-compiled``: the same ``generate`` with a static KV cache, which transformers
  compiles (``torch.compile``, its ``CompileConfig``: mode reduce-overhead, CUDA graphs) on a GPU:
  the strongest plain-script peer there (issue 18). Each batch size compiles once, in the level's
  warm-up answer, outside the timing. On a CPU transformers does not compile: the mode says so.
* ``llama.cpp`` (CPU): llama.cpp's own server, ``llama-server`` (``tritonchat install-llama-server``
  builds it; loadtest/install_llama_server.py), on a GGUF of the same model written by
  ``loadtest/gguf_convert.py`` (f32; ``q8_0`` when the repository is INT8). It batches continuously,
  ``-np`` = the largest C sequences at once on every core, and the same sweep as the server's runs
  against its OpenAI endpoint (``/v1/completions``, streamed, ``ignore_eos``): the same prompts, lengths
  and clients, so the ratios compare servers. Without a built ``llama-server``: llama-cpp-python
  where installed (one sequence at a time, measured at C = 1 and that rate taken at every C);
  without either, skipped with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from tritonchat.python_backend.manifest import read_manifest

from .stats import mean, pcts

PEERS = ("transformers", "transformers-compiled", "llama.cpp")
ALIASES = {"hf": "transformers", "transformers": "transformers", "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp",
           "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp", "transformers-compiled": "transformers-compiled",
           "compiled": "transformers-compiled", "hf-compiled": "transformers-compiled",
           "transformers-static": "transformers-compiled"}


def normalize_peers(names: List[str]) -> List[str]:
    out = []
    for n in names:
        key = ALIASES.get(n.strip().lower())
        if key is None:
            raise ValueError(f"unknown peer {n!r} (known: {', '.join(PEERS)})")
        if key not in out:
            out.append(key)
    return out


def generator_device(repo: Optional[Path]) -> str:
    """'cuda' when the repository's generator runs on a GPU (and torch sees one), else 'cpu'."""
    if repo is not None:
        try:
            text = (Path(repo) / "generator" / "config.pbtxt").read_text()
        except OSError:
            text = ""
        if "KIND_GPU" in text:
            try:
                import torch

                if torch.cuda.is_available():
                    return "cuda"
            except Exception:  # noqa: BLE001
                pass
    return "cpu"


def run_peers(cfg, model_dir: Optional[Path], prompts: List[str], progress, console,
              tag: str = "", sweep=None) -> Dict[str, Any]:
    """`sweep`: the bench's own sweep (bench._sweep), run against llama.cpp's server (passed in, not
    imported: bench imports this module)."""
    results: Dict[str, Any] = {}
    for name in normalize_peers(cfg.peers):
        if model_dir is None or not Path(model_dir).is_dir():
            results[name] = {"skipped": "no Hugging Face model folder: pass --model HF_DIR"}
            continue
        try:
            if name.startswith("transformers"):
                results[name] = transformers_peer(cfg, Path(model_dir), prompts, progress, tag,
                                                  compiled=name == "transformers-compiled")
            else:
                results[name] = llama_server_peer(cfg, Path(model_dir), prompts, progress, sweep, tag) \
                    or llama_cpp_peer(cfg, Path(model_dir), prompts, progress, tag)
        except Exception as exc:  # noqa: BLE001 - a peer failing must not lose the server's figures
            results[name] = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
            console.print(f"[yellow]peer {name} failed:[/] {exc}")
    return results


# -------------------------------------------------------------------------------------------- transformers


def transformers_peer(cfg, model_dir: Path, prompts: List[str], progress, tag: str = "",
                      compiled: bool = False) -> Dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

    device = generator_device(cfg.model_repository)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    # the GPU peer runs in bf16, as the reference figures do; CPU in fp32
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    M = cfg.output_len
    gen_kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
    name = "transformers"
    if compiled:
        # transformers compiles the decode forward itself when the cache is static (on CUDA, not on
        # a CPU); the config spelled out so the figures say what ran
        gen_kw.update(cache_implementation="static",
                      compile_config=CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead"))
        name = "transformers-compiled"

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def generate(enc, n):
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, **gen_kw)
        sync()
        return out

    levels = []
    for c in cfg.peer_levels():
        n_req = cfg.requests_for(c)
        n_batches = max(1, math.ceil(n_req / c))
        task = progress.add_task(f"{tag}{name} B={c:<3}", total=n_batches)
        batch = [prompts[i % len(prompts)] for i in range(c)]
        enc = tok(batch, return_tensors="pt", padding=True).to(device)
        # warm-up: one whole answer at this batch size. A 2-token warm-up left the first timed batch
        # several times slower than the next ones, which made the peer look slower than it is when a
        # level ran only 2 batches (figures: docs/benchmarks-gpu.md, "The peer was understated").
        generate(enc, M)
        if compiled:
            generate(enc, 1)  # a static cache of another length: its own warm-up
        t = time.perf_counter()
        generate(enc, 1)
        ttft = (time.perf_counter() - t) * 1e3
        times, capped, start = [], False, time.perf_counter()
        new_tokens = None
        for _ in range(n_batches):
            if time.perf_counter() - start > cfg.max_seconds_per_level:
                capped = True
                break
            t = time.perf_counter()
            out = generate(enc, M)
            times.append(time.perf_counter() - t)
            new_tokens = out.shape[1] - enc["input_ids"].shape[1]
            progress.advance(task)
        progress.update(task, completed=n_batches)
        total = sum(times)
        done = len(times) * c
        e2e = [x * 1e3 for x in times]
        itl = [(x * 1e3 - ttft) / (M - 1) for x in times] if M > 1 else []
        levels.append({
            "concurrency": c, "requests": done, "errors": 0, "time_capped": capped, "wall_s": total,
            "output_tokens": done * (new_tokens or M), "tokens_per_request": new_tokens,
            "prompt_tokens": float(enc["input_ids"].shape[1]),
            "output_tokens_per_s": done * (new_tokens or M) / total if total else None,
            "requests_per_s": done / total if total else None,
            "ttft_ms": {"p50": ttft, "p90": None, "p99": None, "mean": ttft},
            "itl_ms": pcts(itl), "e2e_ms": pcts(e2e),
        })
    mode = "generate, batch = C"
    if compiled:
        mode += ", static cache, " + ("compiled (reduce-overhead, CUDA graphs)" if device == "cuda"
                                      else "not compiled (transformers compiles on GPUs only)")
    return {"mode": f"{mode}, {device}", "device": device, "levels": levels,
            "torch_threads": torch.get_num_threads()}


# -------------------------------------------------------------------------------------------- llama.cpp


def _gguf(cfg, model_dir: Path, quantize: Optional[Path]) -> Tuple[Path, str]:
    """The model as GGUF for llama.cpp (cached beside the bench's output): f32, or q8_0 when the
    repository is INT8 (its own quantizer, `llama-quantize`, as llama.cpp users make it)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        from .install_llama_server import gguf_py_dir

        vendored = gguf_py_dir()
        if vendored is None:
            raise PeerSkipped("the gguf package is not installed (pip install gguf): cannot convert the model")
        sys.path.insert(0, str(vendored))
    from .gguf_convert import ConvertError, convert

    cache = Path(cfg.out) if cfg.out else Path(tempfile.gettempdir())
    cache.mkdir(parents=True, exist_ok=True)
    f32 = cache / f"{model_dir.name}.f32.gguf"
    try:
        if not f32.is_file():
            convert(model_dir, f32)
    except ConvertError as exc:
        raise PeerSkipped(f"GGUF conversion not possible: {exc}") from None
    if quantize is None or read_manifest(cfg.model_repository).get("precision") not in ("int8", "int8-weight-only"):
        return f32, "f32"
    q8 = cache / f"{model_dir.name}.q8_0.gguf"
    if not q8.is_file():
        r = subprocess.run([str(quantize), str(f32), str(q8), "q8_0"], capture_output=True, text=True)
        if r.returncode != 0:
            raise PeerSkipped(f"llama-quantize failed: {(r.stdout + r.stderr)[-300:]}")
    return q8, "q8_0"


class PeerSkipped(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_peer(cfg, model_dir: Path, prompts: List[str], progress, sweep,
                      tag: str = "") -> Optional[Dict[str, Any]]:
    """llama.cpp's server at every level of `sweep` (None when no llama-server is built)."""
    from .install_llama_server import find_llama_server

    binary = find_llama_server()
    if binary is None or sweep is None:
        return None
    try:
        gguf_path, kind = _gguf(cfg, model_dir, binary.with_name("llama-quantize")
                                if binary.with_name("llama-quantize").is_file() else None)
    except PeerSkipped as exc:
        return {"skipped": str(exc)}
    slots = max(cfg.concurrency)
    per_slot = cfg.prompt_len + cfg.output_len + 64
    threads = os.cpu_count() or 1
    port = _free_port()
    cmd = [str(binary), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(slots * per_slot), "-t", str(threads), "-tb", str(threads), "-b", "2048", "--no-webui"]
    log = open(Path(tempfile.gettempdir()) / f"llama-server-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        one = dataclasses.replace(cfg, protocol="openai", model_name="peer", overhead_repeats=0, warmup=max(cfg.warmup, 2))
        out = asyncio.run(sweep(one, f"127.0.0.1:{port}", None, None, prompts, progress, with_overhead=False,
                                tag=f"{tag}llama-server "))
    finally:
        proc.terminate()  # stopped by its pid, whatever happened
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return {"mode": f"llama-server -np {slots} -t {threads} (continuous batching), {kind}", "levels": out["levels"],
            "gguf": str(gguf_path), "binary": str(binary), "command": " ".join(cmd)}


def llama_cpp_available() -> Optional[str]:
    """None when llama-cpp-python imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return (f"llama-cpp-python is not installed ({type(exc).__name__}: {str(exc)[:80]}); "
                "pip install llama-cpp-python (builds llama.cpp from source)")
    return None


def llama_cpp_peer(cfg, model_dir: Path, prompts: List[str], progress, tag: str = "") -> Dict[str, Any]:
    reason = llama_cpp_available()
    if reason:
        return {"skipped": reason}
    try:
        import gguf  # noqa: F401
    except ImportError:
        return {"skipped": "the gguf package is not installed (pip install gguf): cannot convert the model"}
    import llama_cpp

    from .gguf_convert import ConvertError, convert

    cache = Path(cfg.out) if cfg.out else Path(tempfile.gettempdir())
    gguf_path = cache / f"{model_dir.name}.f32.gguf"
    try:
        convert(model_dir, gguf_path)
    except ConvertError as exc:
        return {"skipped": f"GGUF conversion not possible: {exc}"}
    M = cfg.output_len
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=cfg.prompt_len + M + 16, n_threads=threads,
                          n_threads_batch=threads, n_batch=max(32, cfg.prompt_len + 1), verbose=False)
    n_req = min(cfg.requests_for(1), 8)
    task = progress.add_task(f"{tag}llama.cpp  C=1  ", total=n_req + 1)
    records = []

    def one(prompt: str):
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
        llm.reset()
        t0 = time.perf_counter()
        stamps = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= M:
                break
        return t0, stamps, len(ids)

    one(prompts[0])  # warm-up
    progress.advance(task)
    start = time.perf_counter()
    capped = False
    for i in range(n_req):
        if time.perf_counter() - start > cfg.max_seconds_per_level:
            capped = True
            break
        records.append(one(prompts[i % len(prompts)]))
        progress.advance(task)
    progress.update(task, completed=n_req + 1)
    wall = sum(r[1][-1] - r[0] for r in records)
    tokens = sum(len(r[1]) for r in records)
    ttft = [(r[1][0] - r[0]) * 1e3 for r in records]
    gaps = [(b - a) * 1e3 for r in records for a, b in zip(r[1], r[1][1:])]
    e2e = [(r[1][-1] - r[0]) * 1e3 for r in records]
    level = {"concurrency": 1, "requests": len(records), "errors": 0, "time_capped": capped, "wall_s": wall,
             "output_tokens": tokens, "tokens_per_request": tokens / len(records) if records else None,
             "prompt_tokens": mean(r[2] for r in records),
             "output_tokens_per_s": tokens / wall if wall else None,
             "requests_per_s": len(records) / wall if wall else None,
             "ttft_ms": pcts(ttft), "itl_ms": pcts(gaps), "e2e_ms": pcts(e2e)}
    return {"mode": f"1 sequence at a time, {threads} threads", "levels": [level], "applies_to_all": True,
            "gguf": str(gguf_path), "llama_cpp_python": getattr(llama_cpp, "__version__", "?")}

"""Smoke tests of the load-testing tools (benchmarks themselves stay out of the test run).

* unit: percentiles, Triton statistics deltas, perf_analyzer profile-export parsing, loopback checks,
  exact-length prompts, the report writer;
* against the real stories260K server (``stories_server``): ``tritonchat bench`` for a few seconds
  (tiny concurrency and lengths, transformers peer included), locust headless for ~5 s, and
  perf_analyzer where it is installed (else skipped with the reason).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tritonchat.loadtest import perf, report, stats
from tritonchat.loadtest.net import NotLoopback, check_loopback

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def _run(cmd, timeout=180, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


# ------------------------------------------------------------------------------------------- unit


def test_percentile_and_mean():
    assert stats.percentile([], 50) is None
    assert stats.percentile([3.0], 99) == 3.0
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert stats.percentile(list(range(101)), 90) == pytest.approx(90)
    assert stats.mean([1, 2, None, 3]) == 2


def test_stats_delta_average_batch():
    before = {"inference_count": "10", "execution_count": "10",
              "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 10, "ns": 1}}],
              "inference_stats": {"queue": {"count": 10, "ns": 10_000_000}}}
    after = {"inference_count": 42, "execution_count": 14,
             "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 11}},
                             {"batch_size": 8, "compute_infer": {"count": 3}},
                             {"batch_size": 7, "compute_infer": {"count": 0}}],
             "inference_stats": {"queue": {"count": 42, "ns": 74_000_000}}}
    d = stats.stats_delta(before, after)
    assert (d["inference_count"], d["execution_count"]) == (32, 4)
    assert d["avg_batch"] == 8.0 and d["max_batch"] == 8
    assert d["batch_histogram"] == {1: 1, 8: 3}
    assert d["queue_ms"] == pytest.approx(2.0)


def test_llm_metrics_from_profile_export():
    ms = 1_000_000
    export = {"experiments": [{"experiment": {"mode": "concurrency", "value": 2}, "requests": [
        {"timestamp": 0, "response_timestamps": [10 * ms, 12 * ms, 16 * ms],
         "response_outputs": [{"num_output_tokens": 1}, {"num_output_tokens": 2}, {"num_output_tokens": 4}]},
        {"timestamp": 5 * ms, "response_timestamps": [25 * ms, 27 * ms],
         "response_outputs": [{"num_output_tokens": 1}, {"num_output_tokens": 2}]},
    ]}]}
    m = perf.llm_metrics(export)["concurrency=2"]
    assert m["requests"] == 2 and m["output_tokens"] == 6
    assert m["ttft_ms"]["p50"] == pytest.approx(15.0)  # 10 and 20 ms
    # gaps per token: 2 (1 token), 2 + 2 (4 ms for 2 tokens), 2 -> all 2 ms
    assert m["itl_ms"]["p50"] == pytest.approx(2.0) and m["itl_ms"]["p99"] == pytest.approx(2.0)
    assert m["output_tokens_per_s"] == pytest.approx(6 / 0.027)


@pytest.mark.parametrize("url", ["127.0.0.1:8001", "http://localhost:8000", "[::1]:8001", "grpc://127.0.0.5:1"])
def test_loopback_accepted(url):
    check_loopback(url)


@pytest.mark.parametrize("url", ["10.0.0.1:8001", "http://0.0.0.0:8000", "http://192.168.1.2", "example.com:80"])
def test_non_loopback_refused(url):
    with pytest.raises(NotLoopback):
        check_loopback(url)


def test_perf_configs_are_complete():
    for name in perf.DEFAULT_CONFIGS:
        cfg = perf.load_config(name)
        data = json.loads(Path(cfg["input_data_path"]).read_text())
        assert data["data"], name
        cmd = perf.command(Path("perf_analyzer"), cfg, "127.0.0.1:8001", 1, cfg["input_data_path"],
                           Path("/tmp/x.json"), requests=5)
        assert cmd[cmd.index("--request-count") + 1] == "5"
        if cfg["report"] == "llm":
            assert "--streaming" in cmd and cmd[cmd.index("-i") + 1] == "grpc"
            assert all(e["stream"] == [True] and e["min_tokens"] == e["max_tokens"] for e in data["data"])


def test_exact_length_prompts(stories_repo):
    from tritonchat.loadtest.prompts import build_prompts, load_tokenizer, server_length, tokenizer_dir_for

    tok = load_tokenizer(tokenizer_dir_for(stories_repo))
    for n in (2, 9, 40):
        prompts = build_prompts(tok, n, count=6)
        assert len(prompts) == 6 and len(set(prompts)) > 1
        assert {server_length(tok, p) for p in prompts} == {n}


def test_report_writes_json_markdown_png(tmp_path):
    level = {"concurrency": 1, "requests": 2, "errors": 0, "output_tokens_per_s": 100.0, "requests_per_s": 2.0,
             "ttft_ms": {"p50": 5.0, "p90": 6.0, "p99": 7.0}, "itl_ms": {"p50": 1.0, "p99": 2.0},
             "e2e_ms": {"p50": 50.0, "p99": 60.0}}
    result = {"config": {"prompt_len": 8, "output_len": 4, "protocol": "grpc"}, "label": "t",
              "server": {"levels": [level]},
              "peers": {"transformers": {"levels": [dict(level, output_tokens_per_s=50.0)]},
                        "llama.cpp": {"skipped": "not installed"}}}
    report.add_ratios(result)
    assert result["ratios"]["transformers"][1] == pytest.approx(2.0)
    paths = report.save(result, tmp_path)
    assert [p.name for p in paths] == ["bench.json", "bench.md", "bench.png"]
    md = (tmp_path / "bench.md").read_text()
    assert "transformers ×2.00" in md and "llama.cpp skipped: not installed" in md
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_title_says_how_the_server_sampled():
    """Greedy, sampled, penalised: the title names what the server's requests carried, and that the
    peers (greedy, no penalties) did not."""
    cfg = {"prompt_len": 32, "output_len": 128}
    assert "greedy)" in report.title({"config": cfg})
    sampled = report.title({"config": {**cfg, "temperature": 0.8, "top_p": 0.95}, "peers": {"x": {}}})
    assert "sampling at temperature 0.8, top_p 0.95, the peers greedy without penalties" in sampled
    both = report.title({"config": {**cfg, "temperature": 0.8, "repetition_penalty": 1.1}})
    assert "temperature 0.8, the server's repetition penalty 1.1)" in both
    assert "greedy, the server's repetition penalty 1.2" in report.title({"config": {**cfg, "repetition_penalty": 1.2}})


def test_client_processes_per_level(monkeypatch):
    from tritonchat.loadtest.bench import BenchConfig

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert [BenchConfig().client_processes_for(c) for c in (1, 16, 32, 33, 64, 128, 512)] == [1, 1, 1, 2, 2, 4, 4]
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert BenchConfig().client_processes_for(64) == 1
    assert BenchConfig(client_processes=3).client_processes_for(64) == 3
    assert BenchConfig(client_processes=8).client_processes_for(2) == 2  # never more than the streams


def test_best_of_rounds_keeps_the_fastest_round():
    from tritonchat.loadtest.bench import best_of_peer_rounds, best_of_rounds

    r1 = {"levels": [{"concurrency": 1, "output_tokens_per_s": 10.0}, {"concurrency": 4, "output_tokens_per_s": 9.0}]}
    r2 = {"levels": [{"concurrency": 1, "output_tokens_per_s": 7.0}, {"concurrency": 4, "output_tokens_per_s": 30.0}]}
    merged = best_of_rounds([r1, r2])
    assert [lv["output_tokens_per_s"] for lv in merged["levels"]] == [10.0, 30.0] and merged["rounds"] == 2
    assert merged["levels"][1]["rounds_output_tokens_per_s"] == [9.0, 30.0]
    peers = best_of_peer_rounds([{"hf": r1, "x": {"skipped": "no"}}, {"hf": r2, "x": {"skipped": "no"}}])
    assert peers["x"] == {"skipped": "no"} and peers["hf"]["levels"][0]["output_tokens_per_s"] == 10.0


def test_static_cache_peer_runs_its_own_levels():
    """The transformers-compiled peer (static cache; transformers compiles it on GPUs only) generates
    exactly output_len tokens a request and runs only --peer-concurrency's levels; its mode says
    that nothing was compiled on a CPU."""
    from rich.progress import Progress

    from e2e_helpers import STORIES
    from tritonchat.loadtest.bench import BenchConfig
    from tritonchat.loadtest.peers import normalize_peers, transformers_peer

    assert normalize_peers(["compiled", "hf"]) == ["transformers-compiled", "transformers"]
    cfg = BenchConfig(concurrency=[1, 2], peer_concurrency=[2], output_len=5, requests_per_level=4)
    with Progress(disable=True) as progress:
        res = transformers_peer(cfg, Path(STORIES), ["Once upon a time", "The cat sat"], progress,
                                compiled=True)
    assert [lv["concurrency"] for lv in res["levels"]] == [2]
    assert res["levels"][0]["tokens_per_request"] == 5 and res["levels"][0]["requests"] == 4
    assert "static cache, not compiled" in res["mode"]


def test_gguf_conversion_matches_transformers(tmp_path):
    """The llama.cpp peer runs the same model: greedy tokens equal transformers' (stories260K)."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python compiles llama.cpp; see docs/benchmarks.md)")
    from e2e_helpers import STORIES, hf_greedy, need

    from tritonchat.loadtest.gguf_convert import convert

    need(STORIES)
    gguf_path = convert(STORIES, tmp_path / "s.gguf")
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_threads=1, verbose=False)
    ids = llm.tokenize(b"Once upon a time", add_bos=True)
    got = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(tok)
        if len(got) == 20:
            break
    assert got == hf_greedy(STORIES, ids, 20)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_locust_refuses_non_loopback(tmp_path):
    res = _run([sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless", "--host", "http://10.9.8.7:8000",
                "-u", "1", "-r", "1", "--run-time", "2s"], timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "loopback only" in res.stderr


# ------------------------------------------------------------------------------------------- server


@pytest.mark.slow
def test_bench_smoke(stories_server, tmp_path):
    out = tmp_path / "bench"
    tok = stories_server.model_repository / "preprocessing" / "1" / "tokenizer"
    from e2e_helpers import STORIES

    res = _run([sys.executable, "-m", "tritonchat.cli", "bench", "--url", stories_server.grpc_url,
                "--http-url", stories_server.http_url, "--tokenizer", tok, "--concurrency", "1,2",
                "--prompt-len", "8", "--output-len", "6", "--requests-per-level", "4", "--out", out,
                "--peers", "transformers,llama.cpp", "--model", STORIES, "--streaming-overhead", "2",
                "--label", "stories260K"], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    levels = result["server"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["errors"] == 0 and lv["requests"] == 4
        assert lv["tokens_per_request"] == 6 and lv["prompt_tokens"] == 8  # exact lengths, read back
        assert lv["ttft_ms"]["p50"] > 0 and lv["output_tokens_per_s"] > 0 and lv["itl_ms"]["per_request_mean"] > 0
        # the gaps between deltas: none where a fast server's 6 tokens all came in the first two responses'
        # time and the courier merged them (seen under a full test run), else positive
        assert lv["itl_ms"]["p50"] is None or lv["itl_ms"]["p50"] > 0
        # the default repository (`detokenize: generator`): the generator sent the text, the entry
        # called postprocessing for none of it (tests/test_streaming_text.py serves both ways)
        assert lv["server_stats"]["postprocessing"]["inference_count"] == 0
    peer = result["peers"]["transformers"]
    assert [lv["concurrency"] for lv in peer["levels"]] == [1, 2] and peer["levels"][0]["tokens_per_request"] == 6
    ratios = result["ratios"]["transformers"]  # JSON: the concurrency keys are strings
    assert sorted(ratios) == ["1", "2"] and all(v > 0 for v in ratios.values())
    llama = result["peers"]["llama.cpp"]
    assert llama.get("skipped") or llama["levels"][0]["tokens_per_request"] == 6
    from tritonchat.loadtest.install_llama_server import find_llama_server

    if find_llama_server() is not None:  # .ci/run builds it: llama.cpp's server ran the same sweep
        assert llama["mode"].startswith("llama-server -np 2"), llama
        assert [lv["concurrency"] for lv in llama["levels"]] == [1, 2]
        assert all(lv["errors"] == 0 and lv["tokens_per_request"] == 6 for lv in llama["levels"])
        assert sorted(result["ratios"]["llama.cpp"]) == ["1", "2"]
        # and it was stopped: no process of it is left
        left = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).startswith(llama["binary"])
                and str(out) in _cmdline(p)]
        assert not left
    assert result["server"]["streaming_overhead"]["tokens"] == 6
    md = (out / "bench.md").read_text()
    assert "tritonserver (grpc)" in md and "TTFT p50" in md
    assert (out / "bench.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_level_in_client_processes(stories_server, tmp_path):
    """A level split over two client processes (started together, records merged) counts every request."""
    out = tmp_path / "bench"
    tok = stories_server.model_repository / "preprocessing" / "1" / "tokenizer"
    res = _run([sys.executable, "-m", "tritonchat.cli", "bench", "--url", stories_server.grpc_url,
                "--tokenizer", tok, "--concurrency", "3", "--prompt-len", "8", "--output-len", "5",
                "--requests-per-level", "7", "--client-processes", "2", "--out", out], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lv, = json.loads((out / "bench.json").read_text())["server"]["levels"]
    assert lv["client_processes"] == 2 and lv["requests"] == 7 and lv["errors"] == 0
    assert lv["tokens_per_request"] == 5 and lv["output_tokens"] == 35
    assert 0 < lv["wall_s"] < 60 and lv["ttft_ms"]["p50"] > 0


@pytest.mark.slow
def test_locust_headless_smoke(stories_server, tmp_path):
    prefix = tmp_path / "locust"
    res = _run([sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless", "--host",
                f"http://{stories_server.http_url}", "--grpc-host", stories_server.grpc_url, "-u", "2", "-r", "2",
                "--run-time", "5s", "--max-requests-per-user", "6", "--max-tokens", "8", "--csv", prefix,
                "--only-summary"], timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
    ttft = [r for (t, _), r in rows.items() if t == "TTFT"]
    assert ttft and all(int(r["Request Count"]) > 0 for r in ttft)
    assert any(t == "ITL" for t, _ in rows) and any(t == "TOKENS/S" for t, _ in rows)
    assert any(t in ("HTTP", "gRPC") for t, _ in rows)
    assert rows[("", "Aggregated")]["Failure Count"] == "0"


@pytest.mark.slow
def test_perf_analyzer_smoke(stories_server, tmp_path):
    from tritonchat.loadtest.install_perf_analyzer import find_perf_analyzer, probe

    pa = find_perf_analyzer()
    if pa is None:
        pytest.skip("perf_analyzer is not installed (not on PATH, nothing under .tools/): "
                    "tritonchat install-perf-analyzer (./setup.sh runs it)")
    works, line = probe(pa)
    if not works:
        pytest.skip(f"perf_analyzer at {pa} does not run here: {line}")
    out = tmp_path / "perf"
    results = perf.run_perf(stories_server.grpc_url, stories_server.http_url, list(perf.DEFAULT_CONFIGS), out,
                            output_len=6, concurrency=[1, 2], perf_analyzer=pa, timeout=120, requests=6)
    runs = {(r["config"], r["concurrency"]): r for r in results["runs"]}
    assert len(runs) == 6
    llm = runs[("ensemble_streaming", 2)]["llm"]
    assert llm["requests"] >= 6 and llm["tokens_per_request"] == 6 and llm["ttft_ms"]["p50"] > 0
    pre = runs[("preprocessing_batching", 2)]["server_stats"]["preprocessing"]
    assert pre["inference_count"] >= 6 and pre["avg_batch"] >= 1.0
    assert (out / "perf_summary.md").read_text().count("|") > 10

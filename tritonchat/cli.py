"""The `tritonchat` command: every sub-command, each a thin wrapper around the module that does the work.

Heavy imports stay inside each function so `--help` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Build, serve, call and measure a chat LLM behind NVIDIA Triton Inference Server.")

SETUP = "Set-up"
TOOLS = "Tools for tests and benchmarks"


# ----------------------------------------------------------------------------------------------- main commands


@app.command("build")
def build(
    model: str = typer.Option(..., "--model", help="Local Hugging Face folder or hub id."),
    output: Path = typer.Option(..., "--output", help="Triton model repository to write."),
    config: Optional[Path] = typer.Option(None, "--config", help="Build config YAML (see docs/build-config.md)."),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size"),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 | int8-weight-only"),
    calibration_data: Optional[Path] = typer.Option(None, "--calibration-data", help="Text file for INT8 calibration."),
    engine: Optional[str] = typer.Option(None, "--engine", help="onnxruntime | tensorrt | torch"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (torch engine)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (torch engine)"),
    skip_gate: bool = typer.Option(False, "--skip-accuracy-gate", help="Do not run the accuracy gate."),
):
    """Export MODEL to ONNX with a KV cache, check parity, and write a Triton model repository."""
    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings

    overrides = {k: v for k, v in dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                       precision=precision, engine=engine, device=device, dtype=dtype,
                                       calibration_data=str(calibration_data) if calibration_data else None).items()
                 if v is not None}
    settings = load_settings(config, **overrides)
    run_build(model, output, settings, accuracy_gate=not skip_gate)


@app.command("serve")
def serve(
    model_repository: Path = typer.Option(..., "--model-repository"),
    http_port: int = typer.Option(8000, "--http-port"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port"),
    log_verbose: int = typer.Option(0, "--log-verbose"),
    print_command: bool = typer.Option(False, "--print-command",
                                       help="Print the tritonserver command line (with its environment) instead "
                                            "of running it."),
):
    """Run the real tritonserver in the foreground on MODEL_REPOSITORY."""
    if print_command:
        from tritonchat.install import ServerNotFoundError
        from tritonchat.server import command_line

        try:
            print(command_line(model_repository, http_port, grpc_port, metrics_port, log_verbose))
        except ServerNotFoundError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)
        return
    from tritonchat.server import serve_foreground

    raise typer.Exit(serve_foreground(model_repository, http_port=http_port, grpc_port=grpc_port,
                                      metrics_port=metrics_port, log_verbose=log_verbose))


@app.command("chat")
def chat(
    prompt: str = typer.Argument(..., help="What to say to the model."),
    url: Optional[str] = typer.Option(None, "--url", help="host:port (default: 127.0.0.1:8001 gRPC, :8000 HTTP)"),
    protocol: str = typer.Option("grpc", "--protocol", help="grpc | http"),
    no_stream: bool = typer.Option(False, "--no-stream", help="Wait for the whole answer."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    model_name: str = typer.Option("ensemble", "--model"),
):
    """Send PROMPT to a running server and print the answer as it arrives."""
    from tritonchat.client.cli_chat import run_chat

    raise typer.Exit(run_chat(prompt, url=url, protocol=protocol, stream=not no_stream, max_tokens=max_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                              raw=raw, model_name=model_name))


@app.command("quickstart")
def quickstart(
    model: Optional[str] = typer.Option(None, "--model", help="Default: ../shared/models/stories260K if present, "
                                                              "else HuggingFaceTB/SmolLM2-135M-Instruct."),
    output: Path = typer.Option(Path("repos/default"), "--output"),
    prompt: str = typer.Option("Once upon a time", "--prompt"),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="Leave the server running (foreground)."),
):
    """Build the default chatbot, serve it with tritonserver and stream one answer."""
    from tritonchat.quickstart import run_quickstart

    raise typer.Exit(run_quickstart(model, output, prompt, keep_serving))


@app.command("eval")
def evaluate(
    model_repository: Path = typer.Option(..., "--model-repository"),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text for perplexity (default: built-in)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="FP32 reference: HF folder, hub id or repository."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Greedy tokens compared per prompt."),
):
    """Accuracy of a repository's engine: perplexity, greedy token agreement, size on disk."""
    from tritonchat.build.evaluate import eval_repository, render_report

    report = eval_repository(model_repository, text, reference, new_tokens=new_tokens)
    render_report(report)


@app.command("bench")
def bench(
    mode: str = typer.Argument("sweep", help="sweep (default) | perf-analyzer | locust"),
    url: Optional[str] = typer.Option(None, "--url", help="host:port of a running server (loopback only)."),
    model_repository: Optional[Path] = typer.Option(None, "--model-repository",
                                                    help="Start tritonserver on this repository (stopped after)."),
    http_url: Optional[str] = typer.Option(None, "--http-url", help="HTTP host:port for Triton's statistics API."),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="Levels, e.g. 1,4,16,64 (the default)."),
    prompt_len: int = typer.Option(32, "--prompt-len", help="Prompt tokens (exact, with the repo's tokenizer)."),
    output_len: int = typer.Option(128, "--output-len", help="Output tokens per request (min_tokens = max_tokens)."),
    requests_per_level: Optional[int] = typer.Option(None, "--requests-per-level",
                                                     help="Requests per level (default max(2C, 8))."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for bench.json / bench.md / bench.png."),
    protocol: str = typer.Option("grpc", "--protocol", help="grpc | http"),
    peers: Optional[str] = typer.Option(None, "--peers", help="Comma list: transformers,llama.cpp"),
    model: Optional[str] = typer.Option(None, "--model", help="HF folder for the peers (default: the repo's model)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (with --url alone)."),
    max_seconds_per_level: float = typer.Option(300.0, "--max-seconds-per-level", help="No new requests after this."),
    streaming_overhead: int = typer.Option(0, "--streaming-overhead",
                                           help="N pairs of the same request streamed vs not (cost per token)."),
    run_time: str = typer.Option("30s", "--run-time", help="locust mode: run time."),
    label: Optional[str] = typer.Option(None, "--label", help="Name of the model in the report."),
    rounds: int = typer.Option(1, "--rounds", help="Alternate server and peers N times; keep each one's best."),
    client_processes: int = typer.Option(0, "--client-processes",
                                         help="Client processes per level (0: auto, ceil(C/32) up to cores/4)."),
    perf_config: Optional[List[str]] = typer.Option(
        None, "--perf-config", help="perf-analyzer mode: configuration name or JSON path (repeatable; default: "
                                    "ensemble_streaming, preprocessing_batching, postprocessing_batching)."),
    perf_analyzer: Optional[Path] = typer.Option(None, "--perf-analyzer",
                                                 help="perf-analyzer mode: the binary (default: PATH, then .tools/)."),
    perf_timeout: float = typer.Option(300.0, "--perf-timeout", help="perf-analyzer mode: seconds per run."),
):
    """Measure the server: a concurrency sweep with peers (TTFT, ITL, tokens/s), perf_analyzer, or locust."""
    from tritonchat.loadtest.modes import run_bench_command

    raise typer.Exit(run_bench_command(mode, url=url, model_repository=model_repository, http_url=http_url,
                                       concurrency=concurrency, prompt_len=prompt_len, output_len=output_len,
                                       requests_per_level=requests_per_level, out=out, protocol=protocol,
                                       client_processes=client_processes,
                                       peers=peers, model=model, tokenizer=tokenizer,
                                       max_seconds_per_level=max_seconds_per_level,
                                       streaming_overhead=streaming_overhead, run_time=run_time, label=label,
                                       rounds=rounds, perf_configs=perf_config, perf_analyzer=perf_analyzer,
                                       perf_timeout=perf_timeout))


# ----------------------------------------------------------------------------------------------- set-up


@app.command("doctor", rich_help_panel=SETUP)
def doctor():
    """Report what is installed: server version, backends, Python stub, perf_analyzer, GPU, TensorRT."""
    from tritonchat.doctor import run_doctor

    raise typer.Exit(run_doctor())


@app.command("setup-server", rich_help_panel=SETUP)
def setup_server(
    no_probe: bool = typer.Option(False, "--no-probe", help="Do not start the server once to record its version."),
):
    """Assemble tritonserver's backend directory (the Python stub for this Python) and record the server version
    (./setup.sh runs it; idempotent)."""
    from tritonchat.server import setup_server as run_setup

    raise typer.Exit(run_setup(probe=not no_probe))


@app.command("install-perf-analyzer", rich_help_panel=SETUP)
def install_perf_analyzer(
    version: Optional[str] = typer.Option(None, "--version", help="perf-analyzer wheel version (default: the one this project was tested "
                                                      "with, DEFAULT_VERSION in loadtest/install_perf_analyzer.py)."),
    force: bool = typer.Option(False, "--force", help="Re-install even when a working install is there."),
    root: Optional[Path] = typer.Option(None, "--root", help="Repository root (default: this checkout)."),
):
    """Install NVIDIA's perf_analyzer into <repo>/.tools/ (./setup.sh runs it; idempotent)."""
    from tritonchat.loadtest.install_perf_analyzer import DEFAULT_VERSION, run_install

    raise typer.Exit(run_install(version or DEFAULT_VERSION, force, root))


# ----------------------------------------------------------------------------------------------- tools


@app.command("synthetic-model", rich_help_panel=TOOLS)
def synthetic_model(
    arch: str = typer.Option(..., "--arch", help="gpt2 | llama | qwen2"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="gpt2 | llama2 (built from the shared folder)"),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    layers: Optional[int] = typer.Option(None, "--layers"),
    hidden: Optional[int] = typer.Option(None, "--hidden"),
    heads: Optional[int] = typer.Option(None, "--heads"),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads"),
    intermediate: Optional[int] = typer.Option(None, "--intermediate"),
    vocab: Optional[int] = typer.Option(None, "--vocab"),
    max_positions: Optional[int] = typer.Option(None, "--max-positions"),
    head_dim: Optional[int] = typer.Option(None, "--head-dim"),
    tie_embeddings: Optional[bool] = typer.Option(None, "--tie-embeddings/--no-tie-embeddings"),
):
    """Write a seeded random-init HF causal LM with a real tokenizer."""
    from tritonchat.build.synthetic import ARCHS, TOKENIZERS, describe, make_random_model

    for name, value, allowed in (("--arch", arch, ARCHS), ("--tokenizer", tokenizer, TOKENIZERS),
                                 ("--dtype", dtype, ("float32", "float16", "bfloat16"))):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=name)
    shape = {k: v for k, v in dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                                   intermediate=intermediate, vocab=vocab, max_positions=max_positions,
                                   head_dim=head_dim, tie_embeddings=tie_embeddings).items() if v is not None}
    written = make_random_model(arch, out, tokenizer=tokenizer, seed=seed, dtype=dtype, **shape)
    print(describe(written))


@app.command("gguf-convert", rich_help_panel=TOOLS)
def gguf_convert(
    model_dir: Path = typer.Argument(..., help="Hugging Face Llama folder."),
    out: Path = typer.Argument(..., help="GGUF file to write."),
    tokenizer_model: Optional[Path] = typer.Option(None, "--tokenizer-model",
                                                   help="SentencePiece model to take the vocabulary from."),
):
    """Convert a Hugging Face Llama to GGUF (F32), for the llama.cpp peer of `tritonchat bench`."""
    from tritonchat.loadtest.gguf_convert import run_convert

    raise typer.Exit(run_convert(model_dir, out, tokenizer_model))


if __name__ == "__main__":
    app()

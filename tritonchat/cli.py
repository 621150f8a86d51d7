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
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 | int8-weight-only; torch engine: fp8 (FP8 weights)"),
    calibration_data: Optional[Path] = typer.Option(None, "--calibration-data", help="Text file for INT8 calibration."),
    engine: Optional[str] = typer.Option(None, "--engine", help="onnxruntime | tensorrt | torch"),
    graph: Optional[str] = typer.Option(None, "--graph", help="onnxruntime engine: auto (the fused CPU graph where "
                                        "the model allows) | export (the TorchScript export)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (torch engine)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (torch engine)"),
    skip_gate: bool = typer.Option(False, "--skip-accuracy-gate", help="Do not run the accuracy gate."),
):
    """Export MODEL to ONNX with a KV cache, check parity, and write a Triton model repository."""
    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings

    overrides = {k: v for k, v in dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                       precision=precision, engine=engine, graph=graph, device=device, dtype=dtype,
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
    host: str = typer.Option("127.0.0.1", "--host", help="Address for HTTP, gRPC and metrics (0.0.0.0: every "
                                                         "interface)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Inference needs this key "
                                                "(authorization: Bearer KEY); see docs/operations.md."),
    admin_key_file: Optional[Path] = typer.Option(None, "--admin-key-file", help="Repository, shared-memory, "
                                                  "statistics, trace and logging APIs need this key (admin-key: KEY)."),
    max_restarts: int = typer.Option(5, "--max-restarts", help="Give up after this many failures in a row, each "
                                     "within a minute of starting (0: exit on the first fault)."),
    liveness_timeout: float = typer.Option(10.0, "--liveness-timeout", help="Restart when /v2/health/live is "
                                           "silent this many seconds."),
    shutdown_timeout: float = typer.Option(4.0, "--shutdown-timeout", help="Seconds from SIGINT/SIGTERM to a "
                                           "forced stop of what is still running."),
    log_verbose: int = typer.Option(0, "--log-verbose"),
    openai_port: Optional[int] = typer.Option(None, "--openai-port", help="Also serve the OpenAI-compatible "
                                              "gateway and its playground on this port (docs/gateway.md)."),
    gateway_config: Optional[Path] = typer.Option(None, "--gateway-config", help="Gateway YAML (client keys, "
                                                  "limits, cache: the keys of GatewayConfig) for --openai-port."),
    print_command: bool = typer.Option(False, "--print-command",
                                       help="Print the tritonserver command line (with its environment, keys "
                                            "redacted) instead of running it."),
):
    """Run the real tritonserver on MODEL_REPOSITORY in the foreground, supervised: restarted when it or a model's
    Python process dies or hangs (docs/operations.md); with --openai-port, the OpenAI gateway beside it."""
    from tritonchat.install import ServerNotFoundError
    from tritonchat.security import Access, KeyFileError, loose_permissions

    try:
        access = Access.from_files(api_key_file, admin_key_file)
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    for key_file in (api_key_file, admin_key_file):
        if key_file and loose_permissions(key_file):
            typer.echo(f"warning: other users may read {key_file} (chmod 600 {key_file})", err=True)
    if print_command:
        from tritonchat.server import command_line

        try:
            print(command_line(model_repository, http_port, grpc_port, metrics_port, log_verbose, host=host,
                               access=access, shutdown_timeout=shutdown_timeout))
        except ServerNotFoundError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)
        return
    from tritonchat.server import serve_foreground
    from tritonchat.supervisor import RestartPolicy

    policy = RestartPolicy(max_restarts=max_restarts, liveness_timeout_s=liveness_timeout,
                           shutdown_timeout_s=shutdown_timeout)
    gateway_cfg = None
    if openai_port is not None:
        from pydantic import ValidationError

        from tritonchat.gateway import load_config

        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        try:  # the gateway reaches Triton on loopback, with Triton's own keys where it is locked
            gateway_cfg = load_config(gateway_config, triton_url=f"{local}:{grpc_port}",
                                      metrics_url=f"{local}:{metrics_port}", host=host, port=openai_port,
                                      triton_api_key_file=api_key_file, triton_admin_key_file=admin_key_file)
        except (ValidationError, ValueError, OSError) as exc:
            typer.echo(f"error: gateway config: {exc}", err=True)
            raise typer.Exit(2)
    raise typer.Exit(serve_foreground(model_repository, http_port=http_port, grpc_port=grpc_port,
                                      metrics_port=metrics_port, log_verbose=log_verbose, host=host,
                                      access=access, policy=policy, gateway=gateway_cfg))


@app.command("gateway")
def gateway(
    triton_url: Optional[str] = typer.Option(None, "--triton-url", help="Triton's gRPC host:port (default "
                                                                        "127.0.0.1:8001)."),
    metrics_url: Optional[str] = typer.Option(None, "--metrics-url", help="Triton's metrics host:port, relayed on "
                                                                          "/metrics (default: not relayed)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port to listen on (default 9000)."),
    model_name: Optional[str] = typer.Option(None, "--model", help="Triton's entry model (default ensemble)."),
    served_model_name: Optional[List[str]] = typer.Option(None, "--served-model-name",
                                                          help="Name clients use as `model` (repeatable)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Client keys: one key or "
                                                "sha256:<hex> per line (docs/gateway.md). Default: no keys."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Requests in flight per key."),
    requests_per_s: Optional[float] = typer.Option(None, "--rate", help="Requests per second per key "
                                                                       "(token bucket)."),
    burst: Optional[int] = typer.Option(None, "--burst", help="Token bucket size (default max(1, rate))."),
    cache: Optional[str] = typer.Option(None, "--cache", help="memory (default) | off | redis://HOST:PORT/DB"),
    cache_ttl: Optional[float] = typer.Option(None, "--cache-ttl", help="Seconds a cached answer lives (1800)."),
    triton_api_key_file: Optional[Path] = typer.Option(None, "--triton-api-key-file",
                                                       help="Triton's API key (when `serve` locks it)."),
    triton_admin_key_file: Optional[Path] = typer.Option(None, "--triton-admin-key-file",
                                                         help="Triton's admin key (lets the cache read versions "
                                                              "from the repository index)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Gateway config YAML (keys of GatewayConfig; "
                                                                 "options override it)."),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug | info | warning | error"),
):
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and the web playground
    in front of a running tritonserver (docs/gateway.md)."""
    from pydantic import ValidationError

    from tritonchat.gateway import load_config, run

    try:
        cfg = load_config(config, triton_url=triton_url, metrics_url=metrics_url, host=host, port=port,
                          model=model_name, served_model_names=served_model_name or None,
                          api_key_file=api_key_file, max_concurrent=max_concurrent, requests_per_s=requests_per_s,
                          burst=burst, cache=cache, cache_ttl_s=cache_ttl, triton_api_key_file=triton_api_key_file,
                          triton_admin_key_file=triton_admin_key_file, log_level=log_level)
    except (ValidationError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run(cfg))


@app.command("chat")
def chat(
    prompt: Optional[str] = typer.Argument(None, help="What to say to the model (with -i: the first turn)."),
    interactive: bool = typer.Option(False, "-i", "--interactive", help="A multi-turn conversation that keeps the "
                                                                       "history (Ctrl-C stops an answer, Ctrl-D ends)."),
    system: Optional[str] = typer.Option(None, "--system", help="With -i: a system message for the conversation."),
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
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TRITONCHAT_API_KEY",
                                          help="Key of a server started with --api-key-file (prefer the "
                                               "environment variable: a command line is visible to others)."),
):
    """Send PROMPT to a running server and print the answer as it arrives; -i: chat, turn after turn."""
    if interactive:
        if raw or no_stream:
            typer.echo("error: -i streams chat turns with the chat template (no --raw, no --no-stream)", err=True)
            raise typer.Exit(2)
        from tritonchat.client.cli_chat import run_repl

        raise typer.Exit(run_repl(prompt, url=url, protocol=protocol, max_tokens=max_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, stop=stop, system=system,
                                  model_name=model_name, api_key=api_key))
    if prompt is None:
        typer.echo("error: give a PROMPT, or -i for a conversation", err=True)
        raise typer.Exit(2)
    from tritonchat.client.cli_chat import run_chat

    raise typer.Exit(run_chat(prompt, url=url, protocol=protocol, stream=not no_stream, max_tokens=max_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                              raw=raw, model_name=model_name, api_key=api_key))


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
    protocol: str = typer.Option("grpc", "--protocol", help="grpc | http | openai (a gateway at --url)"),
    peers: Optional[str] = typer.Option(None, "--peers",
                                        help="Comma list: transformers, transformers-compiled, llama.cpp"),
    peer_concurrency: Optional[str] = typer.Option(None, "--peer-concurrency",
                                                   help="Levels the transformers peers run (default: "
                                                        "--concurrency's; a compiled peer compiles once a level)."),
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
    gateway: bool = typer.Option(False, "--gateway", help="Also start the OpenAI gateway beside the server "
                                                          "(--model-repository) and measure it against direct gRPC, "
                                                          "level by level, in the same run."),
    openai_url: Optional[str] = typer.Option(None, "--openai-url", help="A running gateway (host:port) to measure "
                                                                        "against direct gRPC (--url or "
                                                                        "--model-repository)."),
    openai_model: str = typer.Option("ensemble", "--openai-model", help="The `model` name the gateway serves."),
    temperature: float = typer.Option(0.0, "--temperature", help="The server's requests sample at this temperature "
                                                                  "(unseeded; 0: greedy). The peers stay greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="With --temperature: nucleus sampling."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="With --temperature: top-k sampling."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty",
                                                       help="The server's requests carry this repetition penalty "
                                                            "(greedy or sampled). The peers have none."),
):
    """Measure the server: a concurrency sweep with peers (TTFT, ITL, tokens/s), perf_analyzer, or locust;
    --gateway / --openai-url: the OpenAI gateway against direct gRPC (--protocol openai --url: the gateway alone)."""
    from tritonchat.loadtest.modes import run_bench_command

    raise typer.Exit(run_bench_command(mode, url=url, model_repository=model_repository, http_url=http_url,
                                       concurrency=concurrency, prompt_len=prompt_len, output_len=output_len,
                                       requests_per_level=requests_per_level, out=out, protocol=protocol,
                                       client_processes=client_processes,
                                       peers=peers, model=model, tokenizer=tokenizer,
                                       max_seconds_per_level=max_seconds_per_level,
                                       streaming_overhead=streaming_overhead, run_time=run_time, label=label,
                                       rounds=rounds, perf_configs=perf_config, perf_analyzer=perf_analyzer,
                                       perf_timeout=perf_timeout, openai_url=openai_url, gateway=gateway,
                                       openai_model=openai_model, peer_concurrency=peer_concurrency,
                                       temperature=temperature, top_p=top_p, top_k=top_k,
                                       repetition_penalty=repetition_penalty))


@app.command("deploy")
def deploy(
    url: str = typer.Option("127.0.0.1:8000", "--url", help="HTTP host:port of the running tritonserver."),
    repo: Optional[Path] = typer.Option(None, "--repo", help="The repository the server serves (to copy a "
                                                             "version into, and to record the choice)."),
    source: Optional[Path] = typer.Option(None, "--from", help="A built repository (its newest generator "
                                                               "version) or a version folder: staged as the "
                                                               "next version, then served."),
    version: Optional[int] = typer.Option(None, "--version", help="Serve this version (already in the repository)."),
    rollback: bool = typer.Option(False, "--rollback", help="Serve the version served before this one."),
    model: str = typer.Option("generator", "--model"),
    admin_key_file: Optional[Path] = typer.Option(None, "--admin-key-file", help="The server's admin key "
                                                  "(`serve --admin-key-file`); else $TRITONCHAT_ADMIN_KEY."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="The server's API key, for the model "
                                                "config (`serve --api-key-file`); else $TRITONCHAT_API_KEY."),
    drain_timeout: float = typer.Option(600.0, "--drain-timeout", help="Seconds to wait for the old version's "
                                                                       "requests in flight."),
    stage_only: bool = typer.Option(False, "--stage-only", help="With --from: copy the version in, load nothing."),
):
    """Hot model update: load a new generator version beside the serving one, move traffic, drain and unload
    the old one; --rollback goes back. Without --from/--version/--rollback: the versions and their states."""
    from tritonchat.deploy import run_deploy
    from tritonchat.security import KeyFileError, read_key_file

    try:
        admin_key = read_key_file(admin_key_file, "admin key") if admin_key_file else None
        api_key = read_key_file(api_key_file, "API key") if api_key_file else None
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_deploy(url, repo=repo, source=source, version=version, rollback=rollback, model=model,
                                admin_key=admin_key, api_key=api_key, drain_timeout=drain_timeout,
                                stage_only=stage_only))


# ----------------------------------------------------------------------------------------------- set-up


@app.command("doctor", rich_help_panel=SETUP)
def doctor(
    url: Optional[str] = typer.Option(None, "--url", help="Check a running deployment at this HTTP host:port "
                                                          "instead: the checklist for a 503, a fix per failure."),
    metrics_url: Optional[str] = typer.Option(None, "--metrics-url", help="With --url: the metrics host:port "
                                                                          "(default: port 8002 beside 8000)."),
    gateway_url: Optional[str] = typer.Option(None, "--gateway-url", help="With --url: the OpenAI gateway too."),
    model: str = typer.Option("ensemble", "--model", help="With --url: the entry model."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="With --url: the inference key."),
    admin_key_file: Optional[Path] = typer.Option(None, "--admin-key-file", help="With --url: the admin key "
                                                  "(reads the repository index)."),
    repo: Optional[Path] = typer.Option(None, "--repo", help="With --url: the model repository (disk check)."),
):
    """Report what is installed: server version, backends, Python stub, perf_analyzer, GPU, TensorRT; with --url,
    walk the 503 checklist against a running deployment (models, stubs, overload, metrics, GPU, shm, disk)."""
    if url is None:
        from tritonchat.doctor import run_doctor

        raise typer.Exit(run_doctor())
    import os

    from tritonchat.doctor import Target, run_doctor_url
    from tritonchat.security import KeyFileError, read_key_file

    try:
        api_key = read_key_file(api_key_file, "API key") if api_key_file else os.environ.get("TRITONCHAT_API_KEY")
        admin_key = (read_key_file(admin_key_file, "admin key") if admin_key_file
                     else os.environ.get("TRITONCHAT_ADMIN_KEY"))
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_doctor_url(Target(url, metrics_url=metrics_url, gateway_url=gateway_url, model=model,
                                           api_key=api_key, admin_key=admin_key, repo=repo)))


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


@app.command("install-llama-server", rich_help_panel=SETUP)
def install_llama_server(
    version: Optional[str] = typer.Option(None, "--version", help="llama-cpp-python sdist whose vendored llama.cpp is "
                                                      "built (default: DEFAULT_VERSION in loadtest/install_llama_server.py)."),
    sdist: Optional[Path] = typer.Option(None, "--sdist", help="A llama-cpp-python sdist already downloaded."),
    jobs: int = typer.Option(0, "--jobs", help="Parallel compile jobs (0: every core)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a build of this version is there."),
    root: Optional[Path] = typer.Option(None, "--root", help="Repository root (default: this checkout)."),
):
    """Build llama.cpp's llama-server (CPU) into <repo>/.tools/bin/: the bench's llama.cpp peer (idempotent)."""
    from tritonchat.loadtest.install_llama_server import DEFAULT_VERSION, run_install

    raise typer.Exit(run_install(version or DEFAULT_VERSION, force, root, sdist, jobs))


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


@app.command("soak", rich_help_panel=TOOLS)
def soak(
    model_repository: Optional[Path] = typer.Option(None, "--model-repository",
                                                    help="Start tritonserver on this repository (stopped after)."),
    url: Optional[str] = typer.Option(None, "--url", help="gRPC host:port of a running server (loopback only)."),
    minutes: float = typer.Option(10.0, "--minutes", help="How long to run after the warm-up."),
    concurrency: int = typer.Option(32, "--concurrency", help="Streams at once (above the slots: saturation)."),
    warmup: float = typer.Option(30.0, "--warmup", help="Seconds of the same load before the measured run."),
    cancel_p: float = typer.Option(0.2, "--cancel-p", help="Fraction of requests cancelled after 1-6 responses."),
    hang_s: float = typer.Option(30.0, "--hang-s", help="A request without progress this long counts as hung."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for soak.json."),
):
    """The server at saturation for N minutes: done / errors / hung / cancelled and every process's RSS."""
    from tritonchat.loadtest.soak import run_soak

    raise typer.Exit(run_soak(model_repository, url, minutes, concurrency, warmup, cancel_p, hang_s, seed, out))


if __name__ == "__main__":
    app()

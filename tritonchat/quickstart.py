"""`tritonchat quickstart`: build the default chatbot, serve it with tritonserver, stream one answer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)

HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_model() -> str:
    """The small pretrained model of the shared folder ($TRITONCHAT_SHARED, `../shared` of the working
    directory or of the checkout), else a small hub chat model."""
    from tritonchat.build.synthetic import shared_dir

    for shared in (shared_dir(), Path.cwd() / ".." / "shared"):
        candidate = shared / "models" / "stories260K"
        if (candidate / "config.json").exists():
            return str(candidate.resolve())
    return HUB_DEFAULT


def _is_current(repo: Path, model: str) -> bool:
    manifest = repo / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("model") == model


def run_quickstart(model: str | None, output: Path, prompt: str, keep_serving: bool) -> int:
    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings
    from tritonchat.client import ChatClient, GenerationParams
    from tritonchat.server import ServerStartError, TritonServer, serve_foreground

    model = model or default_model()
    if _is_current(output, model):
        console.print(f"[dim]Using the repository already built from {model} at {output}[/dim]")
    else:
        run_build(model, output, load_settings())
    if keep_serving:
        console.print("Serving in the foreground (Ctrl-C stops). In another shell: "
                      f"[bold].venv/bin/tritonchat chat \"{prompt}\"[/bold]")
        return serve_foreground(output, http_port=8000, grpc_port=8001, metrics_port=8002, log_verbose=0)
    console.print("Starting tritonserver ...")
    try:
        with TritonServer(output) as server:
            console.print(f"[green]Ready[/green]: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                          f"metrics {server.metrics_url}")
            client = ChatClient(server.grpc_url, protocol="grpc")
            console.print(f"[bold]> {prompt}[/bold]")
            t0 = time.perf_counter()
            ttft, last = None, None
            for delta in client.stream(prompt, GenerationParams(max_tokens=96, apply_chat_template=True)):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                last = delta
            sys.stdout.write("\n")
            elapsed = time.perf_counter() - t0
            n = last.num_output_tokens if last and last.num_output_tokens else 0
            console.print(f"[dim]finish_reason={last.finish_reason if last else None}, {n} tokens, "
                          f"first token {1000 * (ttft or 0):.0f} ms, {n / elapsed:.0f} tokens/s[/dim]")
            client.close()
    except ServerStartError as exc:
        console.print(f"[red]tritonserver did not start:[/red] {exc}")
        return 1
    console.print(f"Serve it yourself: [bold].venv/bin/tritonchat serve --model-repository {output}[/bold]")
    return 0

"""`tritonchat build`: model -> ONNX (KV cache) -> parity -> [quantize -> gate] -> [TensorRT] -> repository."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)

PARITY_PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", "Hello"]
EVAL_PROMPTS = ["Once upon a time", "The little dog", "One day, a girl named", "The sun was"]


class BuildError(RuntimeError):
    pass


def resolve_model(model: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded with huggingface_hub."""
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise BuildError(f"{p} has no config.json: not a Hugging Face model folder")
        return p
    from tritonchat.download import DownloadError, download_model  # resumable; HF_ENDPOINT for a mirror

    try:
        return download_model(model)
    except DownloadError as exc:
        raise BuildError(str(exc)) from exc


@contextlib.contextmanager
def _step(progress: Progress, label: str):
    task = progress.add_task(label, total=None)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        progress.update(task, total=1, completed=1,
                        description=f"{label} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")


def run_build(model_id: str, output: Path, settings: dict, *, accuracy_gate: bool = True,
              progress_console: Console | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from tritonchat.build import export
    from tritonchat.build.repository import template_values, write_repository

    con = progress_console or console
    engine, precision = settings["engine"], settings["precision"]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=con, transient=False) as progress, \
            tempfile.TemporaryDirectory(prefix="tritonchat-build-") as tmp:
        tmp = Path(tmp)
        with _step(progress, f"Resolve model {model_id}"):
            src = resolve_model(model_id)
        with _step(progress, "Load model and tokenizer"):
            dtype = getattr(torch, settings["dtype"]) if engine == "torch" else torch.float32
            model = export.load_model(str(src), dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(src))
            spec = export.KVSpec.from_config(model.config)
            try:
                gen_cfg = GenerationConfig.from_pretrained(str(src)).to_dict()
            except OSError:
                gen_cfg = {"eos_token_id": tokenizer.eos_token_id}
        max_seq_len = int(settings["max_seq_len"] or min(spec.max_position_embeddings, 2048))
        if max_seq_len > spec.max_position_embeddings:
            raise BuildError(f"max_seq_len {max_seq_len} exceeds the model's {spec.max_position_embeddings} positions")
        info = {"model": model_id, "architecture": model.config.model_type, "engine": engine,
                "precision": precision if engine != "torch" or precision != "fp32" else settings["dtype"],
                "max_seq_len": max_seq_len,
                "max_batch_size": settings["max_batch_size"], "kv_spec": spec.to_json()}
        files: dict[str, Path] = {}

        if engine == "torch":
            if precision != "fp32" and accuracy_gate:
                _weights_gate(progress, con, model, tokenizer, settings, info)
            with _step(progress, "Save weights for the torch engine"):
                model.save_pretrained(str(tmp / "hf"))
                (tmp / "hf" / "kv_spec.json").write_text(json.dumps(spec.to_json()))
            files["hf"] = tmp / "hf"
            model_file = "hf"
        else:
            onnx_dir = tmp / "onnx"
            fp32 = onnx_dir / "model.onnx"
            fused, why = _fused_graph(model, settings)
            info["graph"] = "fused" if fused else "export"
            if fused:
                info["head_screen"] = _head_screen(settings)
            if settings["kv_cache_dtype"] != "float32" and not fused:
                raise BuildError(f"kv_cache_dtype {settings['kv_cache_dtype']} needs the fused CPU graph, "
                                    f"which this build cannot write ({why})")
            if fused:
                from tritonchat.build import ort_graph

                with _step(progress, "Write the fused CPU graph (GroupQueryAttention, KV cache in place)"):
                    # head_dim padded to a multiple of 16
                    cache = ort_graph.write_graph(model, fp32, head_screen=_head_screen(settings))
                    export.write_spec(cache, onnx_dir / "kv_spec.json", kv_layout=ort_graph.LAYOUT,
                                      model_head_dim=spec.head_dim)
            else:
                with _step(progress, "Export to ONNX with KV cache (prefill + decode)"):
                    export.export_onnx(model, fp32)
                    export.write_spec(spec, onnx_dir / "kv_spec.json")
                if why:
                    con.print(f"  graph: the TorchScript export ({why})")
            with _step(progress, "Parity: ONNX Runtime vs PyTorch logits"):
                from tritonchat.build.parity import check_parity

                report = check_parity(model, fp32, tokenizer, PARITY_PROMPTS, settings["parity_tolerance"])
                info["parity_max_abs_diff"] = float(report.max_abs_diff)
            con.print(f"  parity: max |Δlogit| = {report.max_abs_diff:.2e} (tolerance {settings['parity_tolerance']:g})")
            chosen = fp32
            if settings["kv_cache_dtype"] == "float16":  # the same graph, its KV and attention in float16
                chosen = _half_kv(progress, con, model, tokenizer, tmp, spec, settings, info,
                                  accuracy_gate and precision == "fp32")
            if precision != "fp32":
                chosen = _quantize(progress, con, model, tokenizer, spec, chosen, tmp, settings, info, accuracy_gate)
            files["model.onnx"] = chosen
            data = chosen.with_name(chosen.name + ".data")
            if data.exists():
                files["model.onnx.data"] = data
            files["kv_spec.json"] = chosen.parent / "kv_spec.json"  # the quantized one records its precision
            model_file = "model.onnx"
            if engine == "tensorrt":
                model_file = _tensorrt(progress, chosen, tmp, settings, max_seq_len, files)

        values = template_values(settings, max_seq_len=max_seq_len, engine=engine, model_file=model_file,
                                 vocab_size=spec.vocab_size)
        with _step(progress, f"Write Triton repository {output}"):
            write_repository(output, values, tokenizer=tokenizer, generation_config=gen_cfg,
                             generator_files=files, info=info)
    con.print(f"[green]Built[/green] {output}  (engine {engine}, {info['precision']}, context {max_seq_len}, "
              f"{settings['max_batch_size']} sequences in flight)")
    return Path(output)


def _fused_graph(model, settings) -> tuple[bool, str]:
    """(write build/ort_graph.py's fused graph?, why not where it was wanted but cannot be)."""
    if settings["engine"] != "onnxruntime" or settings.get("graph", "auto") != "auto":
        return False, ""
    if settings["precision"] not in ("fp32", "int8-weight-only"):
        return False, f"the fused graph is written for fp32 and int8-weight-only, not {settings['precision']}"
    from tritonchat.build import ort_graph

    ok, why = ort_graph.supported(model)
    return ok, "" if ok else f"the fused graph cannot express this model: {why}"


def _head_screen(settings) -> bool:
    """Does the fused graph carry the LM head's 8-bit copy (build/ort_graph.py)? Not where the head is
    quantized anyway (int8-weight-only)."""
    return bool(settings["head_screen"]) and settings["precision"] == "fp32"


def _half_kv(progress, con, model, tokenizer, tmp: Path, spec, settings, info, accuracy_gate: bool) -> Path:
    """The fused graph with its KV cache in float16 (a quantized build starts from it); gated here
    (fp16's bound) where nothing else will be."""
    from tritonchat.build import export, ort_graph

    out = tmp / "kv-float16" / "model.onnx"
    with _step(progress, "Write the fused CPU graph with a float16 KV cache"):
        cache = ort_graph.write_graph(model, out, kv_dtype="float16", head_screen=_head_screen(settings))
        export.write_spec(cache, out.parent / "kv_spec.json", kv_layout=ort_graph.LAYOUT, model_head_dim=spec.head_dim,
                          kv_dtype="float16")
    info["kv_cache_dtype"] = "float16"
    if accuracy_gate:
        _graph_gate(progress, con, model, tokenizer, out, "fp16", "Accuracy gate (float16 KV cache): perplexity, "
                    "token agreement", settings, info, graph_precision="fp16")
    return out


def _quantize(progress, con, model, tokenizer, spec, fp32: Path, tmp: Path, settings, info, accuracy_gate) -> Path:
    from tritonchat.build.quantize import quantize

    precision = settings["precision"]
    calib = Path(settings["calibration_data"]).read_text() if settings["calibration_data"] else None
    out = tmp / precision / "model.onnx"
    with _step(progress, f"Quantize to {precision}"):
        quantize(fp32, out, precision, calibration_text=calib, tokenizer=tokenizer, spec=spec)
    if accuracy_gate:
        _graph_gate(progress, con, model, tokenizer, out, precision, "Accuracy gate: perplexity, token agreement, "
                    "size", settings, info)
    return out


def _graph_gate(progress, con, model, tokenizer, onnx_path: Path, precision: str, label: str, settings, info,
                graph_precision: str | None = None) -> None:
    """The accuracy gate on a written graph against the PyTorch model, judged with `precision`'s bound
    (`graph_precision`: what the report names the graph; None: read from the graph)."""
    from tritonchat.build.evaluate import evaluate

    with _step(progress, label):
        report = evaluate(model, onnx_path, prompts=EVAL_PROMPTS, tokenizer=tokenizer, precision=graph_precision)
    _judge(con, report, precision, settings, info)


def _judge(con, report, precision: str, settings, info) -> None:
    """Print the gate's report, record it in the manifest's info, stop the build if it is over the bound."""
    from tritonchat.build.evaluate import gate, render_report

    render_report(report, console=con)
    info["accuracy"] = report.to_dict()
    gate(report, precision, settings["accuracy_bounds"])


def _weights_gate(progress, con, model, tokenizer, settings, info) -> None:
    """The torch engine's 8-bit weights are made when it loads (from the weights saved in the build's
    dtype); the gate measures their rounding here, on the build's device."""
    import torch

    from tritonchat.build.evaluate import evaluate_torch_weights

    precision = settings["precision"]
    device = settings["device"] if settings["device"] != "cuda" or torch.cuda.is_available() else "cpu"
    # FP8 for a GPU with W8A8 not switched off: the card that serves it may be a Hopper, whose prompts
    # and steps of many streams round their activations too; gate that, wherever the build runs
    a8 = precision == "fp8" and settings["device"] == "cuda" and settings["models"]["generator"]["w8a8"] == "auto"
    what = "weights and activations" if a8 else "weights"
    with _step(progress, f"Accuracy gate: {precision} {what} against {settings['dtype']} ({device})"):
        report = evaluate_torch_weights(model, precision, tokenizer=tokenizer, device=device, prompts=EVAL_PROMPTS,
                                        activations=a8)
    model.to("cpu")
    _judge(con, report, precision, settings, info)


def _tensorrt(progress, onnx_path: Path, tmp: Path, settings, max_seq_len: int, files: dict) -> str:
    from tritonchat.build.tensorrt import build_engine, plan_meta_path, tensorrt_available

    ok, reason = tensorrt_available()
    if not ok:
        raise BuildError(f"--engine tensorrt needs TensorRT, which is not available here: {reason}. "
                         "Build inside the NGC tritonserver / TensorRT container, or use --engine onnxruntime.")
    trt = settings["tensorrt"]
    plan = tmp / "trt" / "model.plan"
    with _step(progress, "Compile TensorRT engine"):
        build_engine(onnx_path, plan, precision=settings["precision"],
                     profiles={"max_batch_size": settings["max_batch_size"], "max_seq_len": max_seq_len,
                               "opt_batch_size": trt["opt_batch_size"], "opt_seq_len": trt["opt_seq_len"]},
                     timing_cache_path=tmp / "trt" / "timing.cache", workspace_gb=trt["workspace_gb"])
    files["model.plan"] = plan
    files["model.plan.json"] = plan_meta_path(plan)
    return "model.plan"

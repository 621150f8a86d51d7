"""Render the Triton model repository from `model_repository/` templates."""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

from tritonchat.python_backend.manifest import write_manifest

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = ("preprocessing", "generator", "postprocessing", "ensemble")


def template_dir() -> Path:
    if (TEMPLATES / "ensemble" / "config.pbtxt").exists():
        return TEMPLATES
    from importlib.resources import files  # installed (non-editable) package

    return Path(str(files("tritonchat.model_repository")))


def template_values(settings: dict, *, max_seq_len: int, engine: str, model_file: str, vocab_size: int = 0) -> dict:
    """`vocab_size`: the model's (0: unknown; the entry then checks token ids only for sign)."""
    m = settings["models"]
    values = {
        "max_batch_size": settings["max_batch_size"],
        "max_seq_len": max_seq_len,
        "engine": engine,
        # the torch engine: its dtype, or the 8-bit weights' precision (python_backend/engines: TORCH_WEIGHTS)
        "precision": settings["precision"] if engine != "torch" or settings["precision"] != "fp32" else settings["dtype"],
        "model_file": model_file,
        "device": settings["device"],
        "dtype": settings["dtype"],
        # the generator's own process holds no engine with `generate: entry`: no GPU for it then
        "generator_kind": "KIND_GPU" if (settings["device"] == "cuda" or engine == "tensorrt")
        and m["ensemble"]["generate"] == "generator" else "KIND_CPU",
        "vocab_size": int(vocab_size),
        # the entry runs at most the generator's slots plus its waiting line at once, shared by its
        # instances (each process gates its own part)
        "ensemble_max_in_flight": -(-(int(settings["max_batch_size"]) + int(m["generator"]["max_queue_size"]))
                                    // int(m["ensemble"]["instances"])),
    }
    for model, opts in m.items():
        for key, value in opts.items():
            values[f"{model}_{key}"] = str(value).lower() if isinstance(value, bool) else value
    return values


def write_repository(out: Path, values: dict, *, tokenizer, generation_config: dict | None,
                     generator_files: dict[str, Path], info: dict) -> Path:
    """Write a complete repository to `out` (replacing a previous build there).

    generator_files: name inside `generator/1/` -> source path (engine files, kv_spec.json...).
    """
    out = Path(out)
    if out.exists():
        if not (out / "manifest.json").exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a tritonchat repository; choose an empty folder")
        shutil.rmtree(out)
    src = template_dir()
    for model in MODELS:
        (out / model / "1").mkdir(parents=True, exist_ok=True)
        text = string.Template((src / model / "config.pbtxt").read_text()).substitute(values)
        (out / model / "config.pbtxt").write_text(text)
        code = src / model / "1" / "model.py"
        if code.exists():
            shutil.copy2(code, out / model / "1" / "model.py")
    for model in ("preprocessing", "generator", "postprocessing", "ensemble"):
        tokenizer.save_pretrained(str(out / model / "1" / "tokenizer"))
    gen_dir = out / "generator" / "1"
    for name, path in generator_files.items():
        dst = gen_dir / name
        if Path(path).is_dir():
            shutil.copytree(path, dst)
        else:
            shutil.copy2(path, dst)
    # onnx writes external data files 0600: a server running as another user (an image's) could not read
    # them, so they get the read bits the umask gives any other file
    umask = os.umask(0o022)
    os.umask(umask)
    for f in gen_dir.rglob("*"):
        if f.is_file():
            f.chmod(f.stat().st_mode | (0o444 & ~umask))
    if generation_config:
        (gen_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    write_manifest(out, info)
    return out

"""Compile the generator's ONNX graph into a TensorRT plan (TensorRT Python API, 10.x and later).

    build_engine(onnx_path, plan_path, precision="fp16",
                 profiles=make_profiles(max_batch_size=8, max_seq_len=2048),
                 timing_cache_path=..., workspace_gb=4)

Precision comes from the graph that `quantize` wrote: fp32 (the exported graph), fp16 (FP16 graph
with FP32 islands) or int8 (explicit Q/DQ graph, symmetric INT8 with per-channel weight scales;
TensorRT reads the scales from the graph, no calibrator). When TensorRT offers strongly typed
networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11 has nothing else), the graph's
types decide every layer's precision and no precision flag is set -- the FP32 islands that
quantize kept (norms, softmax, rotary angles) stay FP32. On an older, weakly typed TensorRT the
builder flags FP16 / INT8 are set instead. `int8-weight-only` graphs (ONNX Runtime's MatMulNBits)
are not TensorRT graphs: build int8 or fp16 for TensorRT.

Two optimization profiles by default, one per shape the engine runs: `prefill` (batch 1, seq
1..max_seq_len, past 0) and `decode` (batch 1..max_batch_size, seq 1, past 0..max_seq_len-1).
The plan is written with `<plan>.json` beside it (TensorRT version, GPU, compute capability,
precision, profiles, sha256 of the graph and its data) and a copy of kv_spec.json. A plan runs
only with the TensorRT version and GPU it was built for; TrtEngine checks the metadata.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

from tritonchat.python_backend.manifest import sha256_file


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot be imported (or has no GPU to build on)."""


class TensorRTBuildError(RuntimeError):
    pass


def tensorrt_available() -> tuple[bool, str]:
    """(True, 'tensorrt X.Y') when `import tensorrt` works, else (False, 'tensorrt not importable: ...')."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or an OSError from a missing libnvinfer
        return False, f"tensorrt not importable: {exc}"
    return True, f"tensorrt {getattr(trt, '__version__', '?')}"


def _import_trt():
    try:
        import tensorrt as trt
    except Exception as exc:
        raise TensorRTUnavailable(
            f"tensorrt not importable: {exc}. Install TensorRT's Python package for your CUDA "
            "(for example from NVIDIA's package index or a TensorRT container) on a machine with an "
            "NVIDIA GPU, or build with --engine onnxruntime.") from exc
    return trt


def make_profiles(max_batch_size: int, max_seq_len: int, *, opt_prompt: int | None = None,
                  opt_batch_size: int | None = None, opt_past: int | None = None) -> dict:
    """The default optimization profiles for the build config's max_batch_size / max_seq_len.

    Each profile maps a dimension (batch, seq, past) to (min, opt, max): `prefill` tuned for
    `opt_prompt` prompt tokens (default min(256, max_seq_len)), `decode` for `opt_batch_size`
    sequences (default max_batch_size) with `opt_past` cached tokens (default max_seq_len / 2)."""
    b, n = int(max_batch_size), int(max_seq_len)
    if b < 1 or n < 2:
        raise ValueError("max_batch_size >= 1 and max_seq_len >= 2 required")
    opt_prompt = max(1, min(int(opt_prompt or 256), n))
    opt_batch = max(1, min(int(opt_batch_size or b), b))
    opt_past = max(0, min(int(opt_past if opt_past is not None else max(1, n // 2)), n - 1))
    return {
        "prefill": {"batch": (1, 1, 1), "seq": (1, opt_prompt, n), "past": (0, 0, 0)},
        "decode": {"batch": (1, opt_batch, b), "seq": (1, 1, 1), "past": (0, opt_past, n - 1)},
    }


def _normalize_profiles(profiles: Mapping) -> dict[str, dict[str, tuple[int, int, int]]]:
    if not profiles:
        raise ValueError("at least one optimization profile is needed (see make_profiles)")
    if "max_batch_size" in profiles or "max_seq_len" in profiles:  # the build config's limits
        profiles = make_profiles(profiles["max_batch_size"], profiles["max_seq_len"],
                                 opt_prompt=profiles.get("opt_seq_len"), opt_batch_size=profiles.get("opt_batch_size"))
    if set(profiles) <= {"batch", "seq", "past"}:  # one unnamed profile
        profiles = {"default": profiles}
    out = {}
    for name, p in profiles.items():
        dims = {}
        for key in ("batch", "seq", "past"):
            if key not in p:
                raise ValueError(f"profile {name!r} lacks {key!r} (min, opt, max)")
            lo, opt, hi = (int(v) for v in p[key])
            if not (0 <= lo <= opt <= hi) or (key != "past" and lo < 1):
                raise ValueError(f"profile {name!r}: {key} needs 0 <= min <= opt <= max (got {p[key]})")
            dims[key] = (lo, opt, hi)
        out[name] = dims
    return out


def profile_shapes(profile: Mapping[str, tuple[int, int, int]], spec: Mapping) -> dict[str, list[tuple]]:
    """min/opt/max shapes of every graph input for one profile."""
    h, d = int(spec["num_kv_heads"]), int(spec["head_dim"])
    shapes = {}
    for i in range(3):
        b, s, p = profile["batch"][i], profile["seq"][i], profile["past"][i]
        shapes.setdefault("input_ids", []).append((b, s))
        shapes.setdefault("position_ids", []).append((b, s))
        shapes.setdefault("attention_mask", []).append((b, p + s))
        for layer in range(int(spec["num_layers"])):
            for kv in ("key", "value"):
                shapes.setdefault(f"past_key_values.{layer}.{kv}", []).append((b, h, p, d))
    return shapes


def _gpu_facts() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}"}
    except Exception:
        pass
    return {"gpu": None, "compute_capability": None}


def build_engine(onnx_path: Path, plan_path: Path, *, precision: str, profiles: Mapping,
                 timing_cache_path: Path | None = None, workspace_gb: float = 4.0,
                 strongly_typed: bool | None = None, builder_optimization_level: int | None = None,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build `plan_path` from the KV-cache graph `onnx_path` (kv_spec.json beside it); return it.

    `profiles`: {name: {"batch"|"seq"|"past": (min, opt, max)}} (make_profiles), one such profile
    unnamed, or the build config's limits {"max_batch_size", "max_seq_len"[, "opt_batch_size",
    "opt_seq_len"]} which become make_profiles(...).
    `timing_cache_path`: loaded when it exists, saved after the build (speeds up rebuilds).
    `strongly_typed`: None = when this TensorRT offers it. Raises TensorRTUnavailable when
    `import tensorrt` fails and TensorRTBuildError when parsing or building fails.
    """
    from .precision import graph_precision, normalize_precision

    say = progress or (lambda _m: None)
    precision = normalize_precision(precision)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    spec = json.loads((onnx_path.parent / "kv_spec.json").read_text())
    profiles = _normalize_profiles(profiles)
    kind = graph_precision(onnx_path)
    if kind == "int8-weight-only" or precision == "int8-weight-only":
        raise TensorRTBuildError("int8-weight-only graphs use ONNX Runtime's MatMulNBits, which TensorRT does "
                                 "not parse: build --precision int8 (Q/DQ) or fp16 for TensorRT")
    if precision == "int8" and kind != "int8":
        raise TensorRTBuildError(f"precision int8 needs the Q/DQ graph from quantize(..., 'int8'); {onnx_path} is {kind}")
    trt = _import_trt()

    flag_enum = trt.NetworkDefinitionCreationFlag
    can_strong = hasattr(flag_enum, "STRONGLY_TYPED")
    use_strong = can_strong if strongly_typed is None else bool(strongly_typed)
    if use_strong and not can_strong:
        raise TensorRTBuildError(f"TensorRT {trt.__version__} has no strongly typed networks")
    if use_strong and precision == "fp16" and kind == "fp32":
        raise TensorRTBuildError("a strongly typed network runs the graph's own types: convert the graph with "
                                 "quantize(..., 'fp16') first (or pass strongly_typed=False)")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if use_strong:
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    elif hasattr(flag_enum, "EXPLICIT_BATCH"):  # TensorRT < 10 needs it; 10.x deprecates it (always explicit)
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path}")
    # parse_from_file resolves the external data file (model.onnx.data) relative to the graph
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)
    if not use_strong:
        if precision in ("fp16", "int8") and hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ scales; no calibrator is set

    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for pname, prof in profiles.items():
        p = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in profile_shapes(prof, spec).items():
            if tensor in names:
                p.set_shape(tensor, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise TensorRTBuildError(f"optimization profile {pname!r} was refused")

    cache_bytes = b""
    if timing_cache_path is not None and Path(timing_cache_path).exists():
        cache_bytes = Path(timing_cache_path).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    say(f"building the {precision} engine ({'strongly typed' if use_strong else 'weakly typed'}, "
        f"profiles {', '.join(profiles)})")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError("build_serialized_network failed (TensorRT logged the reason above)")
    build_s = time.perf_counter() - t0
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan_path, "wb") as f:
        f.write(serialized)
    if timing_cache_path is not None:
        Path(timing_cache_path).parent.mkdir(parents=True, exist_ok=True)
        with open(timing_cache_path, "wb") as f:
            f.write(config.get_timing_cache().serialize())

    data = onnx_path.parent / (onnx_path.name + ".data")
    meta = {
        "tensorrt_version": trt.__version__,
        **_gpu_facts(),
        "precision": precision,
        "graph": kind,
        "strongly_typed": use_strong,
        "profiles": {k: {d: list(v) for d, v in p.items()} for k, p in profiles.items()},
        "workspace_gb": workspace_gb,
        "onnx": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "onnx_data_sha256": sha256_file(data) if data.exists() else None,
        "build_seconds": round(build_s, 1),
        "plan_bytes": plan_path.stat().st_size,
    }
    plan_meta_path(plan_path).write_text(json.dumps(meta, indent=2))
    spec_out = plan_path.parent / "kv_spec.json"
    if spec_out.resolve() != (onnx_path.parent / "kv_spec.json").resolve():
        shutil.copy(onnx_path.parent / "kv_spec.json", spec_out)
    say(f"wrote {plan_path} ({meta['plan_bytes'] / 1e6:.1f} MB) in {build_s:.0f} s")
    return plan_path


def plan_meta_path(plan_path: Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")

"""Test-wide helpers: where the shared data (`../shared`, never part of this repository) lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_dir() -> Path:
    """$TRITONCHAT_SHARED, else `shared/` beside this checkout (../shared from the repo root)."""
    env = os.environ.get("TRITONCHAT_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


SHARED = shared_dir()


def need_shared(*parts: str) -> Path:
    """The shared file or folder `parts`, or skip the test saying which one is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        rel = "/".join(parts)
        pytest.skip(f"../shared/{rel} not found: {path} is missing "
                    f"(put the shared test data beside this checkout or set TRITONCHAT_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return SHARED


# -- the stories260K repository and its real tritonserver, shared by several test files ----------

@pytest.fixture(scope="session")
def stories_repo(tmp_path_factory):
    from e2e_helpers import STORIES, build_repo, need

    need(STORIES)
    return build_repo(STORIES, tmp_path_factory.mktemp("stories") / "repo")


@pytest.fixture(scope="session")
def stories_server(stories_repo):
    from tritonchat.server import TritonServer

    with TritonServer(stories_repo) as srv:
        yield srv


# -- fp32 / fp16 / int8 / int8-weight-only graphs of stories260K (test_quantize, test_evaluate, test_tensorrt)
STORIES_MODEL = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES_MODEL))


@pytest.fixture(scope="session")
def graphs(tmp_path_factory, tokenizer):
    """{precision: model.onnx} for fp32 (exported) and the three quantized variants."""
    from tritonchat.build.export import export_onnx, load_model, write_spec
    from tritonchat.build.quantize import quantize

    root = tmp_path_factory.mktemp("quant")
    fp32 = root / "fp32" / "model.onnx"
    spec = export_onnx(load_model(str(STORIES_MODEL)), fp32)
    write_spec(spec, fp32.parent / "kv_spec.json")
    out = {"fp32": fp32}
    for p in ("fp16", "int8", "int8-weight-only"):
        out[p] = quantize(fp32, root / p / "model.onnx", p, calibration_text=None, tokenizer=tokenizer, spec=spec)
    return out

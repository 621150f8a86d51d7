"""TensorRT: the plan build and `TrtEngine`. Without TensorRT (and a GPU) the real-engine tests
skip with the exact reason; what needs no TensorRT (profiles, errors, refusals) always runs."""

from __future__ import annotations

import json

import numpy as np
import pytest



def _need_tensorrt():
    from tritonchat.build.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)  # "tensorrt not importable: <ImportError text>"
    import torch

    if not torch.cuda.is_available():
        pytest.skip("tensorrt is importable but torch sees no CUDA GPU")


def test_tensorrt_available_reports_a_reason():
    from tritonchat.build.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        assert ok is False and why == f"tensorrt not importable: {exc}"
    else:
        assert ok is True and why.startswith("tensorrt ")


def test_build_engine_without_tensorrt_raises_clear_error(graphs, tmp_path):  # noqa: F811
    from tritonchat.build.tensorrt import TensorRTUnavailable, build_engine, make_profiles, tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("tensorrt is importable here")
    with pytest.raises(TensorRTUnavailable, match="tensorrt not importable"):
        build_engine(graphs["fp16"], tmp_path / "model.plan", precision="fp16",
                     profiles=make_profiles(4, 64), timing_cache_path=tmp_path / "timing.cache", workspace_gb=1)
    assert not (tmp_path / "model.plan").exists()  # no fake engine, ever
    assert not (tmp_path / "model.plan.json").exists()


def test_graphs_tensorrt_cannot_take_are_refused_before_importing_it(graphs, tmp_path):  # noqa: F811
    from tritonchat.build.tensorrt import TensorRTBuildError, build_engine, make_profiles

    with pytest.raises(TensorRTBuildError, match="MatMulNBits"):
        build_engine(graphs["int8-weight-only"], tmp_path / "a.plan", precision="int8-weight-only",
                     profiles=make_profiles(2, 64))
    with pytest.raises(TensorRTBuildError, match="Q/DQ"):
        build_engine(graphs["fp16"], tmp_path / "b.plan", precision="int8", profiles=make_profiles(2, 64))


def test_trt_engine_without_tensorrt_raises_clear_error(tmp_path):
    from tritonchat.build.tensorrt import tensorrt_available
    from tritonchat.python_backend.engines.trt import TensorRTEngineError
    from tritonchat.python_backend.engines import create_engine

    if tensorrt_available()[0]:
        pytest.skip("tensorrt is importable here")
    with pytest.raises(TensorRTEngineError, match="tensorrt not importable"):
        create_engine("tensorrt", model_path=tmp_path / "model.plan", max_slots=2, max_seq_len=64)


def test_profiles_cover_prefill_and_decode():
    from tritonchat.build.tensorrt import _normalize_profiles, make_profiles, profile_shapes

    profiles = make_profiles(max_batch_size=8, max_seq_len=512)
    assert profiles["prefill"] == {"batch": (1, 1, 1), "seq": (1, 256, 512), "past": (0, 0, 0)}
    assert profiles["decode"] == {"batch": (1, 8, 8), "seq": (1, 1, 1), "past": (0, 256, 511)}
    spec = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8}
    shapes = profile_shapes(profiles["decode"], spec)
    assert shapes["input_ids"] == [(1, 1), (8, 1), (8, 1)]
    assert shapes["attention_mask"] == [(1, 1), (8, 257), (8, 512)]
    assert shapes["past_key_values.1.value"] == [(1, 4, 0, 8), (8, 4, 256, 8), (8, 4, 511, 8)]
    assert len(shapes) == 3 + 2 * 2
    cfg = _normalize_profiles({"max_batch_size": 8, "max_seq_len": 512, "opt_batch_size": 4, "opt_seq_len": 128})
    assert cfg["decode"]["batch"] == (1, 4, 8) and cfg["prefill"]["seq"] == (1, 128, 512)
    one = _normalize_profiles({"batch": (1, 2, 4), "seq": (1, 1, 16), "past": (0, 8, 63)})
    assert list(one) == ["default"]
    with pytest.raises(ValueError):
        _normalize_profiles({"x": {"batch": (2, 1, 4), "seq": (1, 1, 1), "past": (0, 0, 0)}})
    with pytest.raises(ValueError):
        make_profiles(0, 64)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_and_generates_like_onnxruntime(graphs, tokenizer, tmp_path, precision):  # noqa: F811
    _need_tensorrt()
    from tritonchat.build.tensorrt import build_engine, make_profiles, plan_meta_path
    from tritonchat.python_backend.engines.ort import OrtEngine
    from tritonchat.python_backend.engines.trt import TrtEngine

    plan = build_engine(graphs[precision], tmp_path / "model.plan", precision=precision,
                        profiles=make_profiles(4, 128), timing_cache_path=tmp_path / "timing.cache",
                        workspace_gb=1)
    meta = json.loads(plan_meta_path(plan).read_text())
    assert meta["precision"] == precision and meta["onnx_sha256"] and meta["gpu"]
    assert (tmp_path / "timing.cache").stat().st_size > 0 and (tmp_path / "kv_spec.json").exists()

    prompts = [[1] + tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in ("Once upon a time", "The dog ran to the park and")]
    trt_ex = TrtEngine(plan, max_slots=4, max_seq_len=128)
    ort_ex = OrtEngine(graphs[precision], max_slots=4, max_seq_len=128)
    slots = np.array([0, 3])  # non-adjacent slots, different lengths: holes in the mask
    for ex in (trt_ex, ort_ex):
        ex.first = [int(np.argmax(ex.prefill(s, np.asarray(p)))) for s, p in zip(slots, prompts)]
    assert trt_ex.first == ort_ex.first
    a = trt_ex.decode(slots, np.array(trt_ex.first))
    b = ort_ex.decode(slots, np.array(ort_ex.first))
    assert a.shape == b.shape == (2, trt_ex.vocab_size)
    assert np.array_equal(a.argmax(-1), b.argmax(-1))
    assert np.array_equal(trt_ex.decode_greedy(slots, a.argmax(-1)), ort_ex.decode_greedy(slots, b.argmax(-1)))
    assert np.abs(a - b).max() < (0.05 if precision == "fp16" else 0.5)
    assert trt_ex.length(0) == len(prompts[0]) + 2 and trt_ex.length(3) == len(prompts[1]) + 2

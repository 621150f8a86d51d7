"""The tuner's kernels compiled in parallel before any is timed (`W8Matmul.precompile`: Triton's
`AsyncCompileMode`, each candidate's `launch(..., warmup=True)` in a thread pool).

On CPU: the setting, and the warm-ups themselves compiled for an sm_90 target with no GPU
(`benchmarks/tune_compile.py --offline`: Triton's JIT asks its active driver only for the target, the
device and the stream until it launches): every form's arguments (tensor descriptors for the TMA form,
FP8 rows and scales, PDL) go through the real warm-up path and compiler, and a second warm-up of the
same configurations compiles nothing, so the tuner's launches that follow find every kernel compiled.
On a GPU: `tune` itself, no compile on a launch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonchat.python_backend.engines.torch.quant import QuantWeight

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tune_compile.py"


def test_how_many_threads_compile_the_tuners_kernels(monkeypatch):
    """`TRITONCHAT_COMPILE_THREADS` (1: each kernel compiles on its first launch), else one per usable
    CPU up to COMPILE_THREADS; a value that is not a number is refused by name."""
    from tritonchat.python_backend.cpus import usable_cpus
    from tritonchat.python_backend.engines.torch.matmul import COMPILE_THREADS, compile_threads

    monkeypatch.delenv("TRITONCHAT_COMPILE_THREADS", raising=False)
    assert compile_threads() == min(COMPILE_THREADS, usable_cpus())  # a cgroup's quota: tests/test_cpus.py
    monkeypatch.setenv("TRITONCHAT_COMPILE_THREADS", "1")
    assert compile_threads() == 1
    monkeypatch.setenv("TRITONCHAT_COMPILE_THREADS", "0")
    assert compile_threads() == 1
    monkeypatch.setenv("TRITONCHAT_COMPILE_THREADS", "many")
    with pytest.raises(ValueError, match="TRITONCHAT_COMPILE_THREADS"):
        compile_threads()


def test_a_parallel_compile_that_fails_leaves_each_kernel_to_its_launch(monkeypatch, caplog):
    """A warm-up that raises (here before any compile) ends the parallel compile with a warning, not
    the engine's start: the tuner's launches compile what is missing, as without it."""
    from tritonchat.python_backend.engines.torch.matmul import W8Matmul

    def broken(cfg, warmup=False):
        raise RuntimeError("no such kernel")

    monkeypatch.setenv("TRITONCHAT_COMPILE_THREADS", "2")
    mm = W8Matmul(None, sms=4)
    mm.precompile([(broken, {})])
    assert mm.compile_s == 0 and "each compiles on its first launch" in caplog.text


def test_every_forms_warm_up_compiles_for_hopper_in_parallel():
    """Each form of `w8_matmul` (one row: 0, 3, 4; `tl.dot`: 1, 2; TMA; FP8 rows) over int8, FP8 and
    bf16 weights, one configuration of each per tuning job, warmed up in two threads: each one
    compiled there for sm_90, none again on the next warm-up of the same configuration."""
    pytest.importorskip("triton")
    from tritonchat.python_backend.engines.torch.matmul import A8_FORM, TMA_FORM

    r = subprocess.run([sys.executable, str(BENCH), "--threads", "2", "--shapes", "small", "--tma", "--a8-kernel",
                        "--one-per-form", "--offline", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["threads"] == 2 and got["offline"] and got["again"] == 0, got
    assert {TMA_FORM, A8_FORM, 0, 1, 2, 3, 4} <= set(got["forms"]), got
    assert got["kernel_names"] == ["w8_matmul_kernel", "w8_matmul_tma_kernel"], got
    assert 0 < got["kernels"] <= got["configurations"], got  # each a compile of its own, or one shared


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (the parallel compile's GPU run)")
def test_the_tuners_kernels_compile_in_parallel_before_any_is_timed(tmp_path, monkeypatch):
    """`W8Matmul.tune` compiles every candidate in threads (Triton's AsyncCompileMode) first: no
    `w8_matmul` compile happens on a launch; the tuning chosen gives the product (against the float32
    product of the widened weights)."""
    from triton import knobs

    from tritonchat.python_backend.engines.torch.kernels import load_kernels
    from tritonchat.python_backend.engines.torch.matmul import W8Matmul

    monkeypatch.setenv("TRITONCHAT_COMPILE_THREADS", "4")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # every kernel compiled here, none read
    compiles = []

    def seen(*, repr, is_manual_warmup, **_):
        if "w8_matmul" in repr:
            compiles.append(is_manual_warmup)

    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", seen)
    torch.manual_seed(0)
    w = QuantWeight(torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16), "int8", torch.bfloat16)
    mm = W8Matmul(load_kernels(), torch.cuda.get_device_properties(0).multi_processor_count)
    mm.tune([w], [1, 16], reps=3)
    # compiled by the warm-ups, none on a launch (Triton versions differ in whether the hook sees a
    # warm-up's compile under AsyncCompileMode: True where it does)
    assert mm.compile_s > 0 and False not in compiles, compiles
    for m in (1, 16):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.widened().float().T
        assert ((mm(x, w).float() - ref).abs().max() / ref.abs().max()) < 0.02, m

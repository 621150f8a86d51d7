"""The one-kernel decode step experiment (benchmarks/megakernel.py, driven by benchmarks/gpu_megakernel.py).

On CPU: its math, phase by phase under Triton's interpreter, against transformers in float32 on a tiny
seeded Llama (logits, the new key written into the cache; with float atomics and with the ordered
sums); and the fused kernel, barriers included, compiled for sm_90 without a GPU, with its SASS read:
each barrier's counter atomics run on one thread of a program, so a program counts itself once. The
fused kernel's run (every program resident, barriers between phases) needs a GPU: the benchmark
checks it there against transformers before it times it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_megakernel.py"


def _run(*args, **env) -> dict:
    r = subprocess.run([sys.executable, str(DRIVER), *args], env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_each_phase_of_the_one_kernel_step_matches_transformers_interpreted():
    pytest.importorskip("triton")
    got = _run("--tiny", TRITON_INTERPRET="1")["check"]
    assert set(got) == {"tiny phases", "tiny phases det"}, got
    for label, c in got.items():
        assert c["rel_vs_fp32"] < 1e-5 and c["argmax_equal"], (label, c)
        assert c["new_k_rel"] < 1e-5, (label, c)  # the new position's rotated key is in the cache
        assert c["repeat_bitwise"] and c["barrier_timeouts"] == 0, (label, c)


@pytest.mark.parametrize("config", ["0:32:256:128:3:8", "0:32:256:128:3:8:2:1"])
def test_the_fused_step_compiles_for_hopper_with_one_count_per_program_at_each_barrier(config):
    pytest.importorskip("triton")
    got = _run("--compile-hopper", config)
    assert got["counter_atomics"] > 0 and got["counter_atomics_predicated"] == got["counter_atomics"], got
    assert got["stack"] <= 64, got  # 8 warps: no real spilling of the attention's tiles
    assert got["async_copies"] > 0, got  # the weight tiles stream through the pipelined copies
    pf, det = ([int(v) for v in config.split(":")[6:]] + [0, 0])[:2]
    assert (got["l2_prefetches"] > 0) == (pf > 0), got
    assert (got["float_atomics"] == 0) == bool(det), got  # the ordered sums add no floats atomically

"""The model processes' malloc settings: freed buffers are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHURN = r"""
import resource, sys
import numpy as np
from tritonchat.python_backend.allocator import keep_freed_memory
applied = keep_freed_memory()
a = np.ones((16, 6, 256, 48), np.float32)
def step():  # what a decode step does: gather 12 KV views into fresh arrays, then drop them
    return [np.ascontiguousarray(a[:, :, :142]) for _ in range(12)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def churn(env_extra: dict) -> tuple[bool, float]:
    import os

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, env=env, check=True).stdout
    applied, faults = out.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_freed_buffers_are_reused_not_faulted_in_again():
    applied, faults = churn({})
    assert applied
    # 12 x 1.6 MB per step = ~4,800 pages; kept memory is reused, so (almost) no page faults per step
    assert faults < 100, f"{faults} minor page faults per step with the settings applied"
    applied, faults_default = churn({"TRITONCHAT_MALLOC": "default"})
    assert not applied
    assert faults_default > 1000, f"glibc's defaults gave only {faults_default} faults per step (nothing to fix?)"

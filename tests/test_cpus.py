"""The CPUs a process may use (python_backend/cpus.py): its affinity, and below it its cgroup's CPU
quota, which sizes the ORT engine's threads, the GPU tuner's compile threads and the stream rate. A
real cgroup where this machine lets us make one; the file formats of both cgroup versions otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tritonchat.python_backend.cpus import cgroup_cpu_quota, usable_cpus

CORES = len(os.sched_getaffinity(0))


def _v1_cpu_mount() -> Path | None:
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (Path("/sys/fs/cgroup") / name / "cpu.cfs_quota_us").is_file():
            return Path("/sys/fs/cgroup") / name
    return None


def _child_cgroup(quota: str) -> Path:
    """A real child cgroup with `quota` (v2 `cpu.max` or v1 `cpu.cfs_quota_us`), or skip saying why."""
    name = f"tritonchat-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").is_file():
        d = v2 / name
        try:
            d.mkdir()
            (d / "cpu.max").write_text(quota)
        except OSError as e:
            if d.is_dir():
                d.rmdir()
            pytest.skip(f"cannot make a cgroup v2 with a CPU quota here ({e}): needs root and the cpu controller")
        return d
    mount = _v1_cpu_mount()
    if mount is None:
        pytest.skip("no cgroup cpu controller mounted at /sys/fs/cgroup on this machine")
    d = mount / name
    try:
        d.mkdir()
        (d / "cpu.cfs_quota_us").write_text(quota.split()[0])
    except OSError as e:
        if d.is_dir():
            d.rmdir()
        pytest.skip(f"cannot make a cgroup v1 with a CPU quota here ({e}): needs root")
    return d


@pytest.mark.parametrize("quota, expected", [("50000 100000", 1), ("150000 100000", min(CORES, 2))])
def test_a_process_in_a_cgroup_with_a_cpu_quota_sizes_its_threads_by_it(quota, expected):
    """A child process moved into a real cgroup limited to half a CPU (or 1.5) sees 1 (2) usable CPUs,
    and the ORT engine's default threads and the compile threads follow, whatever the machine's cores."""
    d = _child_cgroup(quota)
    code = ("from tritonchat.python_backend.cpus import usable_cpus, cgroup_cpu_quota\n"
            "from tritonchat.python_backend.engines.ort import default_threads\n"
            "from tritonchat.python_backend.engines.torch.matmul import compile_threads\n"
            "print(usable_cpus(), cgroup_cpu_quota(), default_threads(1 << 30), compile_threads())")
    try:
        out = subprocess.run(["sh", "-c", f'echo $$ > {d}/cgroup.procs && exec "$0" -c "$1"', sys.executable, code],
                             capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "TRITONCHAT_COMPILE_THREADS"})
    finally:
        d.rmdir()  # the child has exited: the cgroup is empty
    assert out.returncode == 0, out.stderr
    usable, seen, ort_threads, compile_threads = out.stdout.split()
    assert float(seen) == int(quota.split()[0]) / int(quota.split()[1])
    assert int(usable) == expected
    assert int(ort_threads) == expected  # at most 4 CPUs: every one (ort.default_threads)
    assert int(compile_threads) == expected


def test_doctor_warns_of_a_container_limited_to_less_than_two_cpus():
    """`tritonchat doctor` run inside a real cgroup of half a CPU: its CPUs row names the quota and warns;
    the same doctor outside it says ok (this machine has at least 2 cores, or the row warns there too)."""
    d = _child_cgroup("50000 100000")
    cmd = [sys.executable, "-m", "tritonchat.cli", "doctor", "--url", "127.0.0.1:9"]  # nothing listens there
    env = {**os.environ, "COLUMNS": "250"}
    try:
        inside = subprocess.run(["sh", "-c", f'echo $$ > {d}/cgroup.procs && exec "$@"', "sh", *cmd],
                                capture_output=True, text=True, timeout=300, env=env)
    finally:
        d.rmdir()
    outside = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    row = lambda out: next(line for line in out.stdout.splitlines() if "CPUs" in line)  # noqa: E731
    assert "warn" in row(inside) and "1 usable" in row(inside) and "CPU quota 0.5" in row(inside), inside.stdout
    assert "at least 2 CPUs" in inside.stdout
    assert ("ok" if CORES >= 2 else "warn") in row(outside), outside.stdout


def test_without_a_quota_every_core_of_the_affinity_counts():
    """This test process: its own affinity; a quota, if its cgroup has one, only lowers it."""
    quota = cgroup_cpu_quota()
    assert usable_cpus() == (CORES if quota is None else max(1, min(CORES, -(-quota // 1))))


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_cgroup_v2_the_smallest_quota_on_the_path_counts(tmp_path):
    """v2: `cpu.max` of the process's cgroup and of each parent; "max" is none; the smallest wins."""
    root = _tree(tmp_path, {"cgroup.controllers": "cpu", "kubepods/cpu.max": "400000 100000\n",
                            "kubepods/pod1/cpu.max": "max 100000\n", "kubepods/pod1/c1/cpu.max": "250000 100000\n",
                            "proc": "0::/kubepods/pod1/c1\n"})
    assert cgroup_cpu_quota(root, root / "proc") == 2.5
    (root / "kubepods/pod1/c1/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, root / "proc") == 4.0
    (root / "kubepods/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, root / "proc") is None
    assert usable_cpus(root, root / "proc") == CORES


def test_cgroup_v1_inside_a_container_reads_the_mounts_own_files(tmp_path):
    """v1 in a container without a cgroup namespace: /proc/self/cgroup names the host's path, which is
    not below the mount; the mount is the container's own cgroup. -1 is no quota."""
    root = _tree(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                            "proc": "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"})
    assert cgroup_cpu_quota(root, root / "proc") == 0.5
    assert usable_cpus(root, root / "proc") == 1
    (root / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(root, root / "proc") is None


def test_no_cgroup_file_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path, tmp_path / "absent") is None
    assert usable_cpus(tmp_path, tmp_path / "absent") == CORES

"""How many CPUs this process may use: the cores it may run on (its affinity: a container's cpuset)
and, below that, its cgroup's CPU quota (a Kubernetes CPU limit, `docker run --cpus`), rounded up.

`os.cpu_count()` counts the node's cores: a pod limited to 4 CPUs on a 64-core node that sizes its
thread pools by it runs 32 threads in 4 CPUs' time, and the kernel throttles it for the rest of each
100 ms period: decode steps stall. The runtimes that size themselves by the machine do the same
(Go's GOMAXPROCS from 1.25, the JVM's active processor count).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: str | os.PathLike = CGROUP_ROOT,
                proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int:
    """min(the cores this process may run on, its cgroup's CPU quota rounded up); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(Path(cgroup_root), Path(proc_cgroup))
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup path, cgroup v2 (`cpu.max`) or v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); None where there is none or nothing can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: "0::/path"
            limits += _limits(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # v1: mounted at cpu, or cpu,cpuacct
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (root / mount).is_dir():
                    limits += _limits(root / mount, path, _v1_limit)
                    break
    limits = [q for q in limits if q is not None]
    return min(limits) if limits else None


def _limits(mount: Path, path: str, read) -> list:
    """The limit of the cgroup at `path` below `mount` and of each of its parents. Inside a container
    the mount is often the container's own cgroup while /proc/self/cgroup names the host's path: then
    only the mount's own files answer."""
    here = mount / path.strip("/")
    dirs = [here, *here.parents] if here.is_dir() else [mount]
    return [read(d) for d in dirs if d == mount or mount in d.parents]


def _v2_limit(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period

"""How many intake processes `listener.workers = "auto"` starts: the CPUs this process
may use.

That is its CPU affinity (taskset, systemd's CPUAffinity=, a container's cpuset),
lowered by the cgroup v2 CPU quota (cpu.max) of its cgroup and of every cgroup
above it (systemd's CPUQuota=, docker --cpus, a Kubernetes CPU limit), rounded up,
and at most MAX_AUTO. A number is taken as it is.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

MAX_AUTO = 8


def worker_count(setting: str | int, cgroup_root: Path = Path("/sys/fs/cgroup"),
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """How many intake processes: `setting`, or for "auto" the CPUs this process may
    use (its affinity, and the cgroup v2 CPU quota of its cgroup and those above
    it), at most MAX_AUTO."""
    if setting != "auto":
        return int(setting)
    cpus = len(os.sched_getaffinity(0))
    for quota in _cpu_quotas(cgroup_root, proc_cgroup):
        cpus = min(cpus, quota)
    return max(1, min(cpus, MAX_AUTO))


def _cpu_quotas(root: Path, proc_cgroup: Path) -> list[int]:
    """The CPUs each cgroup on the path to this process may use (cpu.max: "QUOTA
    PERIOD" or "max PERIOD"), rounded up."""
    try:
        own = next((line[3:].strip() for line in proc_cgroup.read_text().splitlines()
                    if line.startswith("0::")), "/")
    except OSError:
        own = "/"
    found = []
    path = root / own.lstrip("/")
    while True:
        with contextlib.suppress(OSError, ValueError):
            quota, period = (path / "cpu.max").read_text().split()[:2]
            if quota != "max":
                found.append(max(1, math.ceil(int(quota) / int(period))))
        if path == root or root not in path.parents:
            return found
        path = path.parent

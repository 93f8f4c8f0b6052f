"""Cores and memory as the scheduler grants them, not the host's.

Under cgroups (containers, SLURM, Kubernetes) and CPU affinity, `os.cpu_count()` and the physical
memory report the whole node: a 4-core job on a 64-core node would start 64 workers, and a guard
against reading more than memory holds would allow half of a 512 GB node to a job granted 16 GB.
The limits are read from the process's CPU affinity, `SLURM_CPUS_PER_TASK`, and its cgroup (v2:
cpu.max, memory.max; v1: cpu.cfs_quota_us / cpu.cfs_period_us, memory.limit_in_bytes), up its
cgroup path to the root. `WILDENBERG_INTAKE_CGROUP_ROOT` points at another cgroup tree (tests).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_UNLIMITED_V1 = 2**60  # cgroup v1 writes ~2**63 for "no limit"


def _cgroup_dirs() -> list[Path]:
    """The folders of this process's cgroup and its ancestors, innermost first (v2 and v1)."""
    root = Path(os.environ.get("WILDENBERG_INTAKE_CGROUP_ROOT", "/sys/fs/cgroup"))
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    out = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        bases = [root] if not controllers else [root / c for c in controllers.split(",")] + [root / controllers]
        for base in bases:
            folder = base / path.lstrip("/")
            while True:
                out.append(folder)
                if folder == base or base not in folder.parents:
                    break
                folder = folder.parent
    out.append(root)
    return list(dict.fromkeys(out))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def available_cpus() -> int:
    """CPUs this process may use: the least of its affinity, SLURM_CPUS_PER_TASK and its cgroups' quotas."""
    limits = []
    try:
        limits.append(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        limits.append(os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        limits.append(int(slurm))
    for folder in _cgroup_dirs():
        v2 = _read(folder / "cpu.max")
        if v2 and not v2.startswith("max"):
            quota, period = v2.split()[:2]
            limits.append(max(1, math.ceil(int(quota) / int(period))))
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            limits.append(max(1, math.ceil(int(quota) / int(period))))
    return max(1, min(limits))


def available_memory() -> int:
    """Bytes of memory this process may use: the least of physical memory and its cgroups' limits."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for folder in _cgroup_dirs():
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read(folder / name)
            if value and value.isdigit() and int(value) < _UNLIMITED_V1:
                limits.append(int(value))
    return min(limits)


def default_workers() -> int:
    """Shard tasks at once by default: one per available CPU, at least 2 (I/O overlaps compute)."""
    return max(2, available_cpus())

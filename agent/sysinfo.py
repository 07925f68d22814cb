"""Facts about this machine that placement and the KV budget need: memory and cores."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def total_memory_bytes() -> int:
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
        return int(out.stdout.strip() or 0)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """Memory a new process could use now (MemAvailable on Linux; free+inactive on macOS)."""
    if sys.platform.startswith("linux"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    if sys.platform == "darwin":
        out = subprocess.run(["vm_stat"], capture_output=True, text=True).stdout
        page = 16384 if platform.machine() == "arm64" else 4096
        free = 0
        for line in out.splitlines():
            if line.startswith(("Pages free", "Pages inactive", "Pages speculative")):
                free += int(line.split(":")[1].strip().rstrip(".")) * page
        return free
    return total_memory_bytes() // 2


def cpu_count() -> int:
    return os.cpu_count() or 1


def backend_name() -> str:
    """The MLX device class this node computes on: metal, cuda or cpu.

    Read from which MLX backend distribution is installed and whether a device is there,
    without importing MLX: the agent process must not load it (only runners compute).
    """
    import importlib.metadata

    def installed(name: str) -> bool:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    if sys.platform == "darwin" and installed("mlx-metal"):
        return "metal"
    nvidia = Path("/proc/driver/nvidia/gpus")
    has_gpu = (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/nvidia0").exists()
    if has_gpu and (installed("mlx-cuda-12") or installed("mlx-cuda-13")):
        return "cuda"
    return "cpu"


def cpu_affinity() -> list[int]:
    """The cores this process may run on (taskset, cpusets), sorted; all cores where unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity masks
        return list(range(cpu_count()))


def usable_cores() -> int:
    """How many cores this process may run on (honours taskset and cpusets, unlike
    os.cpu_count)."""
    return max(1, len(cpu_affinity()))


def cpu_quota() -> float | None:
    """The CPU share this process's cgroup allows, in cores (0.35 = 35% of one), or None.

    cgroup v2 reads `cpu.max` ("quota period" or "max period"); v1 reads `cpu.cfs_quota_us`
    (-1 = none) over `cpu.cfs_period_us`, in the group /proc/self/cgroup names for `cpu`.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, group = line.split(":", 2)
        group = group.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            found = _read(Path("/sys/fs/cgroup") / group / "cpu.max")
            if found:
                quota, _, period = found.partition(" ")
                if quota != "max" and period:
                    return int(quota) / int(period)
        elif "cpu" in controllers.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                base = Path("/sys/fs/cgroup") / mount / group
                quota_text = _read(base / "cpu.cfs_quota_us")
                period_text = _read(base / "cpu.cfs_period_us")
                if quota_text and period_text:
                    quota = int(quota_text)
                    return quota / int(period_text) if quota > 0 else None
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""

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

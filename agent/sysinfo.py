"""Facts about this machine that placement and the KV budget need: memory and cores."""

from __future__ import annotations

import os
import platform
import subprocess
import sys


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
    """The MLX device class this node computes on: metal, cuda or cpu."""
    try:
        import mlx.core as mx
    except ImportError:  # pragma: no cover - mlx is a hard dependency
        return "none"
    if sys.platform == "darwin" and mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and getattr(cuda, "is_available", lambda: False)():
        return "cuda"
    return "cpu"

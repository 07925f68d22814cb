"""Checks of this machine: Python, MLX (backend and version against the cluster's), the BLAS shim
on Linux, memory against the largest model placed here, and disk space for the store.

`probe_mlx` imports MLX in a subprocess (the agent that may run the doctor must not import it);
every `check_*` is a pure function of what was gathered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from agent.doctor.result import Check, fail, ok, warn

MIN_PYTHON = (3, 11)
PROBE = """
import json, sys
out = {}
try:
    import mlx.core as mx
    out["mlx"] = mx.__version__
    out["metal"] = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    cuda = getattr(mx, "cuda", None)
    out["cuda"] = bool(cuda and cuda.is_available())
    out["device"] = str(mx.default_device())
    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
try:
    from agent import sysinfo
    from agent.runtime.blas import describe_blas
    from agent.settings import load_settings
    out["backend"] = sysinfo.backend_name()
    out["blas"] = describe_blas(load_settings(state_dir=sys.argv[1] if len(sys.argv) > 1 else None))
except Exception as exc:
    out["blas_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def start_probe(state_dir: str | None = None) -> subprocess.Popen[str]:
    """Start the MLX probe (a subprocess importing MLX); `finish_probe` reads it. Started
    before the doctor imports anything heavy, so the two overlap."""
    argv = [sys.executable, "-c", PROBE] + ([state_dir] if state_dir else [])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_probe(process: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"error": f"importing MLX took over {timeout:.0f} s"}
    try:
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]
    except (ValueError, IndexError):
        return {"error": (err.strip().splitlines() or ["no output"])[-1]}


def probe_mlx(state_dir: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """MLX's version and devices and the BLAS runners get, from a subprocess."""
    return finish_probe(start_probe(state_dir), timeout)


def check_python(version: Sequence[int]) -> Check:
    text = ".".join(str(v) for v in version[:3])
    if tuple(version[:2]) < MIN_PYTHON:
        return fail("python", f"Python {text}", "install Python 3.11 or newer and run flock "
                    "with it (python3.11 flock.pyz ...)")
    return ok("python", f"Python {text}")


def check_mlx(probe: dict[str, Any], platform: str, cluster_versions: dict[str, str]) -> Check:
    """MLX imports and computes; on macOS on Metal; its version matches the other nodes'
    (`cluster_versions`: node name -> the MLX version it reports, where known)."""
    if "error" in probe:
        return fail("mlx", f"MLX does not work: {probe['error']}",
                    "pip install 'mlx>=0.32' (Linux: 'mlx[cpu]', NVIDIA: 'mlx[cuda]')")
    version = probe.get("mlx", "?")
    backend = "metal" if probe.get("metal") else "cuda" if probe.get("cuda") else "cpu"
    detail = f"MLX {version} on {backend} ({probe.get('device', '?')})"
    if platform == "darwin" and backend != "metal":
        return warn("mlx", detail + ": Metal is not available",
                    "run on Apple silicon with macOS 14 or newer, and install mlx-metal")
    others = {name: v for name, v in cluster_versions.items() if v and v != version}
    if others:
        listed = ", ".join(f"{n} has {v}" for n, v in sorted(others.items()))
        return warn("mlx", f"{detail}; {listed}",
                    f"install the same MLX on every node (pip install 'mlx=={version}')")
    return ok("mlx", detail)


def check_blas(platform: str, probe: dict[str, Any]) -> Check:
    """On Linux runners should get OpenBLAS through flock's shim (the wheel's reference BLAS is
    ~10x slower at prefill)."""
    if platform != "linux":
        return ok("blas", probe.get("blas", "Accelerate (macOS)"))
    blas = probe.get("blas") or probe.get("blas_error", "unknown")
    if "OpenBLAS" in blas:
        return ok("blas", blas)
    return warn("blas", f"runners use {blas}",
                "apt-get install libopenblas0-pthread (or pip install scipy-openblas32) and a C "
                "compiler, then restart flock; `make native` builds the shim ahead")


def check_memory(total: int, available: int, largest_model: tuple[str, int] | None, *,
                 placed: bool = False) -> Check:
    """The largest model placed here (or stored, when nothing is placed) fits what is free;
    `placed`: it is placed here, so it may be loaded already and only the total counts."""
    detail = f"{available / 2**30:.1f} GiB available of {total / 2**30:.1f} GiB"
    if largest_model is None:
        return ok("memory", detail)
    name, size = largest_model
    if size > total:
        return fail("memory", f"{detail}; {name} needs {size / 2**30:.1f} GiB",
                    f"place {name} across several nodes (strategy pipeline) or use a smaller "
                    "or quantized model")
    if size > available and not placed:
        return warn("memory", f"{detail}; {name} needs {size / 2**30:.1f} GiB",
                    "close other programs or place the model across several nodes")
    return ok("memory", f"{detail}; largest model {name} {size / 2**30:.2f} GiB")


def check_disk(free: int, store_bytes: int, path: str, *, min_free: int = 2 * 2**30) -> Check:
    detail = f"{free / 2**30:.1f} GiB free at {path} (store holds {store_bytes / 2**30:.1f} GiB)"
    if free < min_free:
        return fail("disk", detail, f"free space at {path} or move the store (--models-dir): "
                    "pulling a model needs its size again while it is imported")
    if free < store_bytes:
        return warn("disk", detail + "; less than the store's size again",
                    f"free space at {path} before pulling larger models")
    return ok("disk", detail)

"""How fast this node's runners compute: a short timed probe in a runner's environment, cached.

Speed-aware placement compares nodes by what their runners will really do (their BLAS, their
thread split, their cores and CPU quota), so the probe runs as a runner would, in a subprocess:
the agent imports no MLX. Two shapes are timed, because they are limited by different things:
- prefill-shaped: a 512-row matmul, compute-bound everywhere (`compute_gflops`);
- decode-shaped: matrix-vector products over more weights than a cache holds, memory-bound on
  a GPU and at small batch (`decode_gflops`), which is what one decoding stream does.
Results are cached in the state directory under a key of hardware, backend, BLAS, the cores the
process may use and its cgroup CPU quota: a node pinned elsewhere or throttled is measured again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from agent import sysinfo
from agent.settings import NodeSettings

log = logging.getLogger("flock.cluster")

CACHE_FILE = "compute_probe.json"
# Per window; each shape is timed over 3 windows and the best kept: other processes' bursts
# slow a window down, while a CPU quota (enforced per 100 ms period, used up back to back)
# slows every window alike. The whole probe, MLX's import included, takes about 1.5 s.
PROBE_SECONDS = 0.2
_PROBE_TIMEOUT_S = 60.0

COMPUTE_PROBE = r"""
import json, sys, time, mlx.core as mx
seconds = float(sys.argv[1])
def timed(fn, flops):
    mx.eval(fn())
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            mx.eval(fn()); n += 1
        best = max(best, flops * n / (time.perf_counter() - start) / 1e9)
    return best
a = mx.random.normal((512, 576)); b = mx.random.normal((576, 1536)); mx.eval(a, b)
matmul = timed(lambda: a @ b, 2 * 512 * 576 * 1536)
# 8 x 1536x576 float32 matrices (27 MiB, beyond a CPU's last-level cache): each call reads
# every weight once per token, as a decode step does.
ws = [mx.random.normal((1536, 576)) for _ in range(8)]; x = mx.random.normal((1, 576))
mx.eval(ws, x)
matvec = timed(lambda: [x @ w.T for w in ws], 8 * 2 * 1536 * 576)
print(json.dumps({"matmul": matmul, "matvec": matvec}))
"""


@dataclass(frozen=True)
class ComputeSpeed:
    """What the probe measured, and under which conditions."""

    blas: str
    matmul_gflops: float  # prefill-shaped
    matvec_gflops: float  # decode-shaped
    key: str  # the cache key: hardware, backend, BLAS, affinity, quota

    @property
    def measured(self) -> bool:
        return self.matmul_gflops > 0 and self.matvec_gflops > 0


def probe_conditions(blas: str) -> dict[str, object]:
    """What the measured speed depends on; a change in any of it means measuring again."""
    return {
        "machine": platform.machine(),
        "processor": _processor_name(),
        "cores": sysinfo.cpu_count(),
        "memory": sysinfo.total_memory_bytes(),
        "backend": sysinfo.backend_name(),
        "blas": blas,
        "affinity": sysinfo.cpu_affinity(),
        "quota": sysinfo.cpu_quota(),
        "python": sys.version_info[:2],
    }


def probe_key(conditions: dict[str, object]) -> str:
    text = json.dumps(conditions, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def measure_speed(settings: NodeSettings, *, use_cache: bool = True) -> ComputeSpeed:
    """This node's speeds as a runner sees them: from the cache when conditions are unchanged."""
    from agent.runtime.blas import describe_blas

    blas = await asyncio.to_thread(describe_blas, settings)
    conditions = probe_conditions(blas)
    key = probe_key(conditions)
    cache = Path(settings.state_dir) / CACHE_FILE
    if use_cache:
        cached = _read_cache(cache, key)
        if cached is not None:
            return ComputeSpeed(blas, cached[0], cached[1], key)
    matmul, matvec = await _run_probe(settings)
    speed = ComputeSpeed(blas, matmul, matvec, key)
    if speed.measured:
        _write_cache(cache, key, speed, conditions)
    log.info("compute probe: matmul %.1f GFLOP/s, matvec %.1f GFLOP/s (%s, cores %s, quota %s)",
             matmul, matvec, blas, conditions["affinity"], conditions["quota"])
    return speed


async def measure_compute(settings: NodeSettings) -> tuple[str, float]:
    """(BLAS in use, matmul GFLOP/s) as a runner of this node sees them."""
    speed = await measure_speed(settings)
    return speed.blas, speed.matmul_gflops


async def _run_probe(settings: NodeSettings) -> tuple[float, float]:
    from agent.runtime.environment import runner_environment

    env, _ = runner_environment(settings)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", COMPUTE_PROBE, str(PROBE_SECONDS), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await asyncio.wait_for(process.communicate(), _PROBE_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        found = json.loads(out.decode().strip() or "{}")
        return round(float(found["matmul"]), 1), round(float(found["matvec"]), 2)
    except (TimeoutError, ValueError, KeyError, OSError) as exc:
        log.warning("compute probe failed: %s", exc)
        return 0.0, 0.0


def _read_cache(path: Path, key: str) -> tuple[float, float] | None:
    try:
        entry = json.loads(path.read_text()).get(key)
        return float(entry["matmul_gflops"]), float(entry["matvec_gflops"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _write_cache(path: Path, key: str, speed: ComputeSpeed, conditions: dict[str, object]) -> None:
    try:
        entries = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {**{k: v for k, v in asdict(speed).items() if k != "key"},
                    "conditions": conditions}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1, default=str))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not cache the compute probe in %s: %s", path, exc)


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()

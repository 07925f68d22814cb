"""How fast this node's runners multiply matrices: a short probe in a runner's environment.

Speed-aware placement compares nodes by what their runners will really do (their BLAS, their
thread split), so the probe runs as a runner would, in a subprocess: the agent imports no MLX.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from agent.settings import NodeSettings

log = logging.getLogger("flock.cluster")

COMPUTE_PROBE = r"""
import time, mlx.core as mx
a = mx.random.normal((512, 576)); b = mx.random.normal((576, 1536)); mx.eval(a, b)
mx.eval(a @ b)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < 0.3:
    mx.eval(a @ b); n += 1
print(2 * 512 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9)
"""


async def measure_compute(settings: NodeSettings) -> tuple[str, float]:
    """(BLAS in use, matmul GFLOP/s) as a runner of this node sees them."""
    from agent.runtime.blas import describe_blas
    from agent.runtime.environment import runner_environment

    blas = await asyncio.to_thread(describe_blas, settings)
    env, _ = runner_environment(settings)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", COMPUTE_PROBE, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        return blas, round(float(out.decode().strip() or 0.0), 1)
    except (TimeoutError, ValueError, OSError) as exc:
        log.warning("compute probe failed: %s", exc)
        return blas, 0.0

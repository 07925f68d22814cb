"""The process environment a runner starts with: OpenBLAS preloaded on Linux, bounded BLAS threads.

The agent calls `runner_environment` for every runner it spawns and passes the result as the
subprocess's `env`; this is the only place the base environment (os.environ) is read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from agent.runtime.blas import BlasSetup, BlasUnavailable, resolve_blas
from agent.runtime.kernels import kernels_env
from agent.settings import NodeSettings
from agent.sysinfo import usable_cores


def blas_threads(settings: NodeSettings, ranks_on_this_machine: int = 1) -> int:
    """BLAS threads per runner: the setting, else an equal share of the machine's cores.

    A runner's arithmetic runs on MLX's stream thread, which is one of OpenBLAS's threads, and
    its Python thread mostly waits, so a machine that serves flock gets the most from all of its
    cores: on an idle 2-core machine flock decodes SmolLM2 at 20.0 tok/s with 2 threads, 15.2
    with 1 (`python -m bench.decode` with and without `--threads 1`).
    OpenBLAS workers spin while they wait, though: on cores that other busy processes also
    use, a matmul gets an order of magnitude slower (2 busy cores: a 576x1536 matrix-vector
    product took 3,969 us with 2 threads, 323 us with 1). Machines that run other heavy work,
    and several agents on one machine (the demo, the tests), set `blas_threads` lower.
    """
    if settings.blas_threads is not None:
        return settings.blas_threads
    return max(1, usable_cores() // max(1, ranks_on_this_machine))


def with_blas(
    base: Mapping[str, str], setup: BlasSetup | BlasUnavailable | None, threads: int
) -> tuple[dict[str, str], str | None]:
    """base plus the BLAS variables for one runner, and a warning when it falls back.

    setup None means interposition is switched off (blas = "off"): no preload, no warning.
    """
    env = dict(base)
    # Idle OpenBLAS workers spin, so ranks sharing a machine must split its cores. numpy's own
    # bundled OpenBLAS reads the same variable, so it is set even without the shim;
    # OMP_NUM_THREADS covers OpenMP builds of the system libopenblas (MLX's CPU backend uses no
    # OpenMP). OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE from base pass through untouched.
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    if threads > 1:
        # Idle workers go to sleep after ~2^4 cycles instead of spinning for a long while.
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if setup is None:
        return env, None
    if isinstance(setup, BlasUnavailable):
        return env, (
            f"runners use MLX's reference BLAS (prompt processing ~12x slower): {setup.reason}; "
            'pip install scipy-openblas32, or set blas = "off" to silence this'
        )
    preload = env.get("LD_PRELOAD", "")
    # The shim goes first so its cblas_* win over any other preloaded BLAS.
    env["LD_PRELOAD"] = f"{setup.shim}:{preload}" if preload else str(setup.shim)
    env["FLOCK_BLAS_LIB"] = setup.library.path
    return env, None


def runner_environment(
    settings: NodeSettings,
    *,
    ranks_on_this_machine: int = 1,
    base: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], str | None]:
    """The env for one runner subprocess, and a one-line warning when BLAS or the attention
    kernels fall back.

    ranks_on_this_machine: how many runners of the instance share this machine's cores.
    base: the environment to extend (default: this process's).
    """
    env = dict(os.environ if base is None else base)
    if sys.platform != "linux":
        return env, None  # MLX uses Accelerate and Metal on macOS
    threads = blas_threads(settings, ranks_on_this_machine)
    setup = resolve_blas(settings.state_dir) if settings.blas == "auto" else None
    env, warning = with_blas(env, setup, threads)
    extra, kernels_warning = kernels_env(settings)
    env.update(extra)
    warnings = [w for w in (warning, kernels_warning) if w]
    return env, "; ".join(warnings) if warnings else None

"""sgemm throughput under MLX: reference BLAS vs the flockblas shim on OpenBLAS, sgemv path on/off.

Run from the repository root: `python -m bench.blas [--threads N]`. Each configuration runs in its
own process (LD_PRELOAD only takes effect at start), one after another in this run, with the
environment `runner_environment` gives real runners. Shapes are SmolLM2's hidden projections
(576 -> 1536 and 1536 -> 576, as `x @ w.T` like mlx.nn.Linear) at M = 1 (decode) and M = 512
(prefill). Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ((576, 1536), (1536, 576))  # (in, out) features
ROWS = (1, 512)
CONFIGS = ("reference", "openblas_gemm", "openblas_gemv")
# Matmuls per mx.eval at M = 1, so MLX's per-eval overhead does not swamp a ~30 us sgemv.
CHAIN = 16


def measure(rows: int, seconds: float) -> float:
    """GFLOP/s of x @ w.T over both shapes: best-of-3 windows of about `seconds` each."""
    import mlx.core as mx

    flops, elapsed = 0.0, 0.0
    for features_in, features_out in SHAPES:
        w = mx.random.normal((features_out, features_in))
        chain = CHAIN if rows == 1 else 1
        xs = [mx.random.normal((rows, features_in)) for _ in range(chain)]
        mx.eval(w, *xs)
        mx.eval([x @ w.T for x in xs])  # warm-up: thread pools, page faults
        rates = []
        for _ in range(3):
            calls, start = 0, time.perf_counter()
            while (spent := time.perf_counter() - start) < seconds:
                mx.eval([x @ w.T for x in xs])
                calls += chain
            rates.append(spent / calls)
        per_call = min(rates)
        flops += 2.0 * rows * features_in * features_out
        elapsed += per_call
    return flops / elapsed / 1e9


def worker(seconds: float) -> None:
    from agent.runtime.blas import describe_blas

    result = {f"m{rows}": measure(rows, seconds) for rows in ROWS}
    print(json.dumps({"gflops": result, "blas": describe_blas()}))


def environment(config: str, threads: int | None) -> tuple[dict[str, str], int]:
    from agent.runtime.environment import blas_threads, runner_environment
    from agent.settings import load_settings

    settings = load_settings(blas="off" if config == "reference" else "auto", blas_threads=threads)
    env, warning = runner_environment(settings)
    if warning:
        sys.exit(f"bench: {warning}")
    if config != "reference":
        env["FLOCK_BLAS_GEMV"] = "1" if config == "openblas_gemv" else "0"
    return env, blas_threads(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="OpenBLAS threads (default: all cores)")
    parser.add_argument("--seconds", type=float, default=0.3, help="per timing window")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.seconds)
        return
    root = Path(__file__).resolve().parents[1]
    results: dict[str, dict[str, float]] = {}
    for config in CONFIGS:
        env, threads = environment(config, args.threads)
        done = subprocess.run(
            [sys.executable, "-m", "bench.blas", "--worker", "--seconds", str(args.seconds)],
            env=env, cwd=root, capture_output=True, text=True, check=True,
        )
        report = json.loads(done.stdout.strip().splitlines()[-1])
        results[config] = report["gflops"]
        print(f"blas_{config}: {report['blas']}")
    print(f"openblas_threads: {threads}")
    for rows in ROWS:
        for config in CONFIGS:
            print(f"sgemm_m{rows}_{config}_gflops: {results[config][f'm{rows}']:.1f}")
    for rows in ROWS:
        m = f"m{rows}"
        ref, gemm, gemv = (results[c][m] for c in CONFIGS)
        print(f"ratio_m{rows}_openblas_gemm_vs_reference: {gemm / ref:.2f}")
        print(f"ratio_m{rows}_openblas_gemv_vs_reference: {gemv / ref:.2f}")
        print(f"ratio_m{rows}_gemv_on_vs_off: {gemv / gemm:.2f}")


if __name__ == "__main__":
    main()

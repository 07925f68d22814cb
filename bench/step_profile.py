"""One compiled SmolLM2-135M f32 decode step, timed in isolation: what the KV hand-over saves.

Run from the repository root:
`python -m bench.step_profile [--steps 30] [--shapes 1x256,8x256,1x4096]`.

For each shape (rows x capacity) the step runs in its own process with the runners' environment
(the BLAS shim, the runners' OpenBLAS threads), twice, alternating:
- `kv_referenced`: the KV cache object still holds the old arrays while the step is evaluated,
  so MLX must copy each layer's cache before writing the new position (how steps ran before);
- `kv_handed_over`: the cache drops its references when the step is queued
  (`LocalCompute._step`), so MLX writes into the existing buffers.
Prints `name: value` lines (milliseconds a step, medians over alternating rounds); asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import call_in_subprocess, emit, median, runner_env, smollm2_f32_dir

ROUNDS = 3


def step_worker(model_dir: str, rows: int, capacity: int, steps: int) -> dict[str, Any]:
    """Milliseconds a step for both ways of holding the KV arrays, alternating."""
    from pathlib import Path

    import mlx.core as mx

    from agent.runtime.compute import LocalCompute
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import load_decoder

    dec = load_decoder(Path(model_dir), fuse=True)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
    for row in range(rows):
        kv.acquire(f"r{row}", capacity)
    compute = LocalCompute(dec, kv, compiled=True)
    tokens = [1] * kv.rows
    positions = [min(100, capacity - 1)] * kv.rows
    arrays = len(kv.keys)

    def referenced() -> None:
        out = compute.decode_fn(mx.array(tokens), mx.array(positions), *kv.keys, *kv.values)
        mx.eval(out)  # kv.keys / kv.values still refer to the inputs
        kv.keys, kv.values = list(out[1:1 + arrays]), list(out[1 + arrays:])

    def handed_over() -> None:
        logits = compute.decode(tokens, positions)
        mx.eval(logits, kv.keys, kv.values)

    def timed(step: Any) -> float:
        for _ in range(3):
            step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return 1000 * (time.perf_counter() - started) / steps

    result: dict[str, list[float]] = {"kv_referenced": [], "kv_handed_over": []}
    for _ in range(ROUNDS):
        result["kv_referenced"].append(timed(referenced))
        result["kv_handed_over"].append(timed(handed_over))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--shapes", default="1x256,8x256,1x4096", help="rows x capacity, ...")
    parser.add_argument("--threads", type=int, help="OpenBLAS threads (default: as runners)")
    args = parser.parse_args()
    env, threads = runner_env(gemv=True, threads=args.threads)
    emit("openblas_threads", threads)
    model_dir = str(smollm2_f32_dir())
    for shape in args.shapes.split(","):
        rows, capacity = (int(part) for part in shape.split("x"))
        got = call_in_subprocess("bench.step_profile:step_worker",
                                 {"model_dir": model_dir, "rows": rows, "capacity": capacity,
                                  "steps": args.steps}, env)
        held, handed = median(got["kv_referenced"]), median(got["kv_handed_over"])
        emit(f"step_ms_kv_referenced_{shape}", held, 1)
        emit(f"step_ms_kv_handed_over_{shape}", handed, 1)
        emit(f"kv_handover_speedup_{shape}", held / handed)


if __name__ == "__main__":
    main()

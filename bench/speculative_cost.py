"""What a verification step costs against the plain decode step it replaces (issue 14).

    .venv/bin/python -m bench.speculative_cost [--rows 1 8] [--threads N] [--swapped 64 128]

For each batch size (`--rows`) and each `matmul.SWAPPED_MAX_ROWS` setting (`--swapped`) it times,
at the context the bench's edit task has (~400 positions), a plain decode step and a
verification step of every compiled width (`verify.WIDTHS`: the pending token plus k drafted
ones a row), each evaluated with its argmax as the scheduler reads it back. Prints
`name: value` lines, milliseconds, medians of `--repeat` steps, settings interleaved so load
drifts hit them alike:
  cost_r{rows}_s{swapped}_plain_ms     a plain decode step of `rows` rows
  cost_r{rows}_s{swapped}_w{width}_ms  a verification step `width` positions a row
  cost_r{rows}_s{swapped}_w{width}_ratio  that over the plain step
These are the figures `drafting.DraftCost` is sized from.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import bench_models, call_in_subprocess, emit, median, runner_env

CONTEXT = 400  # positions already in the cache: the edit prompt (~350) plus some output


def worker(model_dir: str, rows: list[int], swapped: list[int], repeat: int
           ) -> dict[str, float]:
    import mlx.core as mx

    from agent.runtime import matmul
    from agent.runtime.compute import LocalCompute
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import load_decoder
    from agent.runtime.verify import WIDTHS

    dec = load_decoder(Path(model_dir))
    computes: dict[tuple[int, int], Any] = {}
    for r in rows:
        for s in swapped:
            kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
            for i in range(r):
                kv.acquire(f"s{i}", CONTEXT + 32, rows=r)
            computes[(r, s)] = LocalCompute(dec, kv, compiled=True)

    def plain(compute: Any, r: int) -> None:
        logits = compute.decode([1] * r, [CONTEXT] * r)
        chosen = mx.argmax(logits, axis=-1)
        mx.eval(chosen, compute.kv.keys, compute.kv.values)
        chosen.tolist()

    def verify(compute: Any, r: int, width: int) -> None:
        logits = compute.verify([[1] * width for _ in range(r)], [CONTEXT] * r)
        chosen = mx.argmax(logits, axis=-1)
        mx.eval(chosen, compute.kv.keys, compute.kv.values)
        chosen.tolist()

    shapes: list[tuple[str, int]] = [("plain", 1)] + [("verify", w) for w in WIDTHS]
    times: dict[tuple[int, int, str, int], list[float]] = {}
    for rep in range(repeat + 2):  # the first two rounds compile and warm up
        for (r, s), compute in computes.items():
            matmul.SWAPPED_MAX_ROWS = s  # read at trace time: each compute compiles its own
            for kind, width in shapes:
                began = time.perf_counter()
                if kind == "plain":
                    plain(compute, r)
                else:
                    verify(compute, r, width)
                if rep >= 2:
                    times.setdefault((r, s, kind, width), []).append(time.perf_counter() - began)
    out: dict[str, float] = {}
    for r in rows:
        for s in swapped:
            base = median(times[(r, s, "plain", 1)]) * 1e3
            out[f"cost_r{r}_s{s}_plain_ms"] = base
            for w in WIDTHS:
                ms = median(times[(r, s, "verify", w)]) * 1e3
                out[f"cost_r{r}_s{s}_w{w}_ms"] = ms
                out[f"cost_r{r}_s{s}_w{w}_ratio"] = ms / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--swapped", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    _, model_dir = bench_models(args.models_dir)
    env, threads = runner_env(gemv=True, threads=args.threads)
    emit("cost_blas_threads", threads, 0)
    got = call_in_subprocess("bench.speculative_cost:worker",
                             {"model_dir": str(model_dir), "rows": args.rows,
                              "swapped": args.swapped, "repeat": args.repeat}, env, timeout=900)
    for name, value in got.items():
        emit(name, value, 2)


if __name__ == "__main__":
    main()

"""flock's fused CPU attention kernels against the pure-MLX path and llama.cpp (issue #16).

Run from the repository root: `python -m bench.cpu_kernels [--threads N] [--quick]`.
SmolLM2-135M f32; every flock configuration runs in its own process with the environment real
runners get (the BLAS shim preloaded, OPENBLAS_NUM_THREADS = the runner's share),
FLOCK_KERNELS_LIB pointing at the built extension or "off". llama.cpp is built as
`bench.llamacpp` builds it (cached in the bench cache) and measured with `llama-bench` at the same
thread count.

Figures (`name: value` lines):
- `prefill4k_tok_s_{on,off}`, `prefill512_tok_s_{on,off}`: prompt tok/s of an unseen prompt of
  4,000 / 512 tokens, prefilled in the runner's solo slices (2,048 tokens).
- `decode200_tok_s_{on,off}`, `decode4k_tok_s_{on,off}`: one stream's compiled decode step with
  200 / 4,000 tokens in its cache; `batch8_tok_s_{on,off}`: 8 streams at 200 tokens, aggregate.
- `prefill4k_kernels_vs_off`, `batch8_kernels_vs_off`, `greedy_ids_identical` (24 greedy tokens
  after a 300-token prompt, kernels on and off), and with llama.cpp `prefill4k_vs_llamacpp`
  (/ `pp4096`), `prefill512_vs_llamacpp` (/ `pp512`), `decode200_vs_llamacpp` and
  `decode4k_vs_llamacpp` (/ `tg64` at depth 200 / 4,000).
`--quick` skips llama.cpp (its first build takes many minutes on 2 cores) and the 4K prefill
without kernels is then the longest part (~1.5 min on a quiet 2-core machine). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import call_in_subprocess, cpu_pressure, emit, runner_env, smollm2_f32_dir

SOLO_CHUNK = 2048  # SchedulerLimits.solo_prefill_chunk: a prompt alone prefills in these slices


def worker(model_dir: str, prefill_lengths: list[int], decode_contexts: list[int],
           batch_rows: int, steps: int) -> dict[str, Any]:
    """In a runner-like process: prefill and decode timings, and a short greedy run's ids."""
    from pathlib import Path

    import mlx.core as mx

    from agent.runtime import kernels
    from agent.runtime.compute import LocalCompute
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import load_decoder

    dec = load_decoder(Path(model_dir), fuse=True)
    geometry = KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim)
    out: dict[str, Any] = {}

    def fresh(rows: int, capacity: int) -> tuple[KvSlots, LocalCompute]:
        kv = KvSlots(geometry)
        for row in range(rows):
            kv.acquire(f"r{row}", capacity)
        return kv, LocalCompute(dec, kv, compiled=True)

    # Greedy ids first (also warms the kernels and the compiled step up).
    kv, compute = fresh(1, 512)
    prompt = [3 + (i * 37 + (i * i) % 11) % 4000 for i in range(300)]
    logits = compute.prefill(0, 0, prompt)
    ids = [int(mx.argmax(logits[-1]).item())]
    for i in range(23):
        logits = compute.decode([ids[-1]], [len(prompt) + i])
        ids.append(int(mx.argmax(logits[-1]).item()))
    out["greedy_ids"] = ids
    out["kernels"] = kernels.describe_kernels()  # what this process really uses, now decided

    for n in prefill_lengths:
        kv, compute = fresh(1, n + 16)
        tokens = [5 + (i * 7919) % 45000 for i in range(n)]  # unseen: no prefix reuse
        started = time.perf_counter()
        for start in range(0, n, SOLO_CHUNK):
            mx.eval(compute.prefill(0, start, tokens[start:start + SOLO_CHUNK]))
        out[f"prefill_{n}"] = n / (time.perf_counter() - started)
        del kv, compute

    def decode_rate(rows: int, context: int) -> float:
        _kv, compute = fresh(rows, context + steps + 8)
        tokens = [1] * rows
        for i in range(3):
            mx.eval(compute.decode(tokens, [context + i] * rows))
        started = time.perf_counter()
        for i in range(steps):
            mx.eval(compute.decode(tokens, [context + 3 + i] * rows))
        return rows * steps / (time.perf_counter() - started)

    for context in decode_contexts:
        out[f"decode_{context}"] = decode_rate(1, context)
    if batch_rows:
        out[f"batch_{batch_rows}"] = decode_rate(batch_rows, 200)
    return out


def llamacpp_figures(threads: int) -> dict[str, float] | str:
    """pp4096, pp512 and tg64 at depth 200 / 4000 tok/s, or why llama.cpp is unavailable."""
    from bench.llamacpp import LlamaCppUnavailable, _run, prepare

    try:
        llama, model = prepare()
        bench = str(llama.tool("llama-bench"))
        common = ["-m", str(model), "-t", str(threads), "-r", "2", "-o", "json"]
        figures: dict[str, float] = {}
        report = json.loads(_run([bench, *common, "-p", "512,4096", "-n", "0"], timeout=1200))
        for entry in report:
            figures[f"pp{entry['n_prompt']}"] = float(entry["avg_ts"])
        for depth in (200, 4000):
            report = json.loads(_run([bench, *common, "-p", "0", "-n", "64", "-d", str(depth)],
                                     timeout=1200))
            figures[f"tg64_d{depth}"] = float(report[0]["avg_ts"])
        return figures
    except (LlamaCppUnavailable, KeyError, IndexError, ValueError) as e:
        return str(e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="threads (default: what flock's runners use)")
    parser.add_argument("--quick", action="store_true", help="skip llama.cpp")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps")
    args = parser.parse_args()
    env, threads = runner_env(gemv=True, threads=args.threads)
    emit("threads", threads)
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60", pressure if pressure is not None else "unknown")
    model_dir = str(smollm2_f32_dir())
    from agent.runtime.kernels import ENV, resolve_kernels

    built = resolve_kernels()
    if not hasattr(built, "is_file"):
        emit("kernels", f"unavailable ({built.reason})")  # type: ignore[union-attr]
        return
    kwargs = {"model_dir": model_dir, "prefill_lengths": [512, 4000],
              "decode_contexts": [200, 4000], "batch_rows": 8, "steps": args.steps}
    got = {}
    for mode, value in (("on", str(built)), ("off", "off")):
        got[mode] = call_in_subprocess("bench.cpu_kernels:worker", kwargs,
                                       {**env, ENV: value}, timeout=1800)
        emit(f"kernels_{mode}", got[mode]["kernels"])
        for key, name in (("prefill_4000", "prefill4k"), ("prefill_512", "prefill512"),
                          ("decode_200", "decode200"), ("decode_4000", "decode4k"),
                          ("batch_8", "batch8")):
            emit(f"{name}_tok_s_{mode}", got[mode][key], 1)
    on, off = got["on"], got["off"]
    emit("prefill4k_kernels_vs_off", on["prefill_4000"] / off["prefill_4000"])
    emit("prefill512_kernels_vs_off", on["prefill_512"] / off["prefill_512"])
    emit("decode4k_kernels_vs_off", on["decode_4000"] / off["decode_4000"])
    emit("batch8_kernels_vs_off", on["batch_8"] / off["batch_8"])
    emit("greedy_ids_identical", on["greedy_ids"] == off["greedy_ids"])
    if args.quick:
        return
    llama = llamacpp_figures(threads)
    if isinstance(llama, str):
        emit("llamacpp", f"unavailable ({llama})")
        return
    for key, value in llama.items():
        emit(f"llamacpp_{key}_tok_s", value, 1)
    emit("prefill4k_vs_llamacpp", on["prefill_4000"] / llama["pp4096"])
    emit("prefill512_vs_llamacpp", on["prefill_512"] / llama["pp512"])
    emit("decode200_vs_llamacpp", on["decode_200"] / llama["tg64_d200"])
    emit("decode4k_vs_llamacpp", on["decode_4000"] / llama["tg64_d4000"])


if __name__ == "__main__":
    main()

"""flock's fused CPU attention kernels against the pure-MLX path and llama.cpp (issue #16).

Run from the repository root:
`python -m bench.cpu_kernels [--threads N] [--quick | --llamacpp-only] [--llamacpp-runs 2]`.
SmolLM2-135M f32; every flock configuration runs in its own process with the environment real
runners get (the BLAS shim preloaded, OPENBLAS_NUM_THREADS = the runner's share),
FLOCK_KERNELS_LIB pointing at the built extension or "off". llama.cpp is built as
`bench.llamacpp` builds it (cached in the bench cache) and measured with `llama-bench` at the same
thread count.

Figures (`name: value` lines):
- `prefill4k_tok_s_{on,off}`, `prefill512_tok_s_{on,off}`: prompt tok/s of an unseen prompt of
  4,000 / 512 tokens, prefilled in the runner's solo slices (2,048 tokens).
- `decode200_tok_s_{on,off}`, `decode4k_tok_s_{on,off}`: one stream's compiled decode step with
  200 / 4,000 tokens in its cache; `batch8_tok_s_{on,off}`: 8 streams at 200 tokens, aggregate
  (each the median of 3 windows of `--steps` steps).
- `prefill4k_kernels_vs_off`, `batch8_kernels_vs_off`, `greedy_ids_identical` (24 greedy tokens
  after a 300-token prompt, kernels on and off), and with llama.cpp `prefill4k_vs_llamacpp`
  (/ `pp4096`), `prefill512_vs_llamacpp` (/ `pp512`), `decode200_vs_llamacpp` and
  `decode4k_vs_llamacpp` (/ `tg64` at depth 200 / 4,000).
Each llama.cpp figure is also printed raw (`llamacpp_pp4096_tok_s`, `llamacpp_pp512_tok_s`,
`llamacpp_tg64_d200_tok_s`, `llamacpp_tg64_d4000_tok_s`, the mean of `--llamacpp-runs`); where
llama.cpp cannot be built or run (or its llama-bench lacks `-d`), those figures and the ratios
read `unavailable (<reason>)`. Without the extension built, flock's pure-MLX figures stand in the
ratios against llama.cpp and the kernels-vs-off figures read `unavailable`.
`--quick` skips llama.cpp (its first build took ~70 minutes on 2 busy cores) and the 4K prefill
without kernels is then the longest part (~1.5 min on a quiet 2-core machine);
`--llamacpp-only` prints llama.cpp's figures alone. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import call_in_subprocess, cpu_pressure, emit, runner_env, smollm2_f32_dir

SOLO_CHUNK = 2048  # SchedulerLimits.solo_prefill_chunk: a prompt alone prefills in these slices
DECODE_WINDOWS = 3  # each decode figure: the median of this many timed windows


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
        # The median of DECODE_WINDOWS windows of `steps` steps: one burst of the other work on
        # a shared machine moves one window, not the figure.
        _kv, compute = fresh(rows, context + DECODE_WINDOWS * steps + 8)
        tokens = [1] * rows
        for i in range(3):
            mx.eval(compute.decode(tokens, [context + i] * rows))
        rates = []
        for window in range(DECODE_WINDOWS):
            first = context + 3 + window * steps
            started = time.perf_counter()
            for i in range(steps):
                mx.eval(compute.decode(tokens, [first + i] * rows))
            rates.append(rows * steps / (time.perf_counter() - started))
        return sorted(rates)[len(rates) // 2]

    for context in decode_contexts:
        out[f"decode_{context}"] = decode_rate(1, context)
    if batch_rows:
        out[f"batch_{batch_rows}"] = decode_rate(batch_rows, 200)
    return out


LLAMACPP_RATIOS = (  # figure name, flock's measurement, llama-bench's test
    ("prefill4k_vs_llamacpp", "prefill_4000", "pp4096"),
    ("prefill512_vs_llamacpp", "prefill_512", "pp512"),
    ("decode200_vs_llamacpp", "decode_200", "tg64_d200"),
    ("decode4k_vs_llamacpp", "decode_4000", "tg64_d4000"),
)


def llamacpp_figures(threads: int, runs: int = 2) -> dict[str, float | str]:
    """llama-bench's tok/s for pp512, pp4096 and tg64 at depth 200 / 4000 on the f32 GGUF, each
    a number or the reason it is unavailable (a llama-bench without `-d` measures no depth)."""
    from bench.llamacpp import LlamaCppUnavailable, _run, _supports_depth, prepare

    try:
        llama, model = prepare()
    except LlamaCppUnavailable as e:
        return {test: str(e) for _, _, test in LLAMACPP_RATIOS}
    bench = str(llama.tool("llama-bench"))
    common = ["-m", str(model), "-t", str(threads), "-r", str(runs), "-o", "json"]
    figures: dict[str, float | str] = {"source": llama.source}
    try:
        report = json.loads(_run([bench, *common, "-p", "512,4096", "-n", "0"], timeout=1800))
        for entry in report:
            figures[f"pp{entry['n_prompt']}"] = float(entry["avg_ts"])
    except (LlamaCppUnavailable, KeyError, ValueError, TypeError) as e:
        figures.update({"pp512": str(e), "pp4096": str(e)})
    for depth in (200, 4000):
        name = f"tg64_d{depth}"
        if not _supports_depth(llama):
            figures[name] = f"{llama.source}'s llama-bench has no -d/--n-depth"
            continue
        try:
            report = json.loads(_run([bench, *common, "-p", "0", "-n", "64", "-d", str(depth)],
                                     timeout=1200))
            figures[name] = float(report[0]["avg_ts"])
        except (LlamaCppUnavailable, KeyError, IndexError, ValueError, TypeError) as e:
            figures[name] = str(e)
    for _, _, test in LLAMACPP_RATIOS:
        figures.setdefault(test, "llama-bench did not report it")
    return figures


def emit_llamacpp(llama: dict[str, float | str]) -> None:
    """llama.cpp's raw tok/s, each as a number or `unavailable (<reason>)`."""
    if "source" in llama:
        emit("llamacpp_source", llama["source"])
    for _, _, test in LLAMACPP_RATIOS:
        value = llama[test]
        emit(f"llamacpp_{test}_tok_s",
             value if isinstance(value, float) else f"unavailable ({value})", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="threads (default: what flock's runners use)")
    parser.add_argument("--quick", action="store_true", help="skip llama.cpp")
    parser.add_argument("--llamacpp-only", action="store_true",
                        help="only llama.cpp's figures (building it first if need be)")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps")
    parser.add_argument("--llamacpp-runs", type=int, default=2,
                        help="llama-bench repetitions per test (it reports their mean)")
    args = parser.parse_args()
    env, threads = runner_env(gemv=True, threads=args.threads)
    emit("threads", threads)
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60", pressure if pressure is not None else "unknown")
    if args.llamacpp_only:
        emit_llamacpp(llamacpp_figures(threads, args.llamacpp_runs))
        return
    model_dir = str(smollm2_f32_dir())
    from agent.runtime.kernels import ENV, resolve_kernels

    built = resolve_kernels()
    # Without the extension flock still runs (MLX's attention): its figures against llama.cpp
    # are then those of the pure-MLX path, and the on/off comparisons are unavailable.
    modes: dict[str, str] = {"off": "off"}
    if hasattr(built, "is_file"):
        modes = {"on": str(built), **modes}
    else:
        emit("kernels", f"unavailable ({built.reason})")  # type: ignore[union-attr]
    kwargs = {"model_dir": model_dir, "prefill_lengths": [512, 4000],
              "decode_contexts": [200, 4000], "batch_rows": 8, "steps": args.steps}
    got = {}
    for mode, value in modes.items():
        got[mode] = call_in_subprocess("bench.cpu_kernels:worker", kwargs,
                                       {**env, ENV: value}, timeout=1800)
        emit(f"kernels_{mode}", got[mode]["kernels"])
        for key, name in (("prefill_4000", "prefill4k"), ("prefill_512", "prefill512"),
                          ("decode_200", "decode200"), ("decode_4000", "decode4k"),
                          ("batch_8", "batch8")):
            emit(f"{name}_tok_s_{mode}", got[mode][key], 1)
    off = got["off"]
    on = got.get("on")
    for name, key in (("prefill4k_kernels_vs_off", "prefill_4000"),
                      ("prefill512_kernels_vs_off", "prefill_512"),
                      ("decode4k_kernels_vs_off", "decode_4000"),
                      ("batch8_kernels_vs_off", "batch_8")):
        emit(name, on[key] / off[key] if on else "unavailable (no kernels built)")
    emit("greedy_ids_identical",
         on["greedy_ids"] == off["greedy_ids"] if on else "unavailable (no kernels built)")
    if args.quick:
        return
    llama = llamacpp_figures(threads, args.llamacpp_runs)
    emit_llamacpp(llama)
    flock = on or off
    for name, key, test in LLAMACPP_RATIOS:
        value = llama[test]
        emit(name, flock[key] / value if isinstance(value, float) else f"unavailable ({value})")


if __name__ == "__main__":
    main()

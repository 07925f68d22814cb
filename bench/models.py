"""Serving quantized checkpoints as stored: memory and decode speed of SmolLM2 4-bit kept.

Run from the repository root: `python -m bench.models [--rounds 3] [--tokens 128]`. Every figure
comes from fresh processes with the environment flock's runners get (the flockblas shim preloaded,
sgemv fast path on in every process, flock's and mlx-lm's alike).

- `kept4bit_rss_vs_f32`: (peak RSS - RSS before loading weights) of a process that does what a
  runner does (`agent.runtime.runner.load`, then 32 greedy tokens through the scheduler) with
  SmolLM2 converted to 4-bit by `mlx_lm.convert -q` and `dtype = "keep"`, over the same with
  `dtype = "float32"` (the same 4-bit directory dequantized at load). Goal <= 0.30.
- `kept4bit_decode_vs_mlxlm`: greedy decode tok/s of that 4-bit directory kept quantized through
  flock's scheduler (bench.decode's flock worker) over mlx-lm's `generate_step` in-process on the
  same directory; medians over rounds. Goal >= 0.95.

Prints `name: value` lines only; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CACHE,
    call_in_subprocess,
    cpu_pressure,
    emit,
    median,
    runner_env,
    smollm2_f32_dir,
)


def smollm2_4bit_dir() -> Path:
    """The same directory the tests use (tests/conftest.py smollm2_4bit_dir), made once."""
    from tests.quant_models import convert_quantized

    return convert_quantized(smollm2_f32_dir(), CACHE / "models" / "smollm2-135m-4bit-g64")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_worker(model_dir: str, dtype: str, tokens: int) -> dict[str, Any]:
    """Peak RSS over the RSS before the weights, of a runner's load and a short generation."""
    import mlx.core as mx  # noqa: F401  (imported before the baseline: not the weights' cost)
    import mlx_lm.tokenizer_utils  # noqa: F401

    from agent.generation import GenerationRequest, SamplingParams
    from agent.runtime.protocol import RunnerConfig
    from agent.runtime.runner import load
    from agent.runtime.scheduler import Scheduler

    before = _rss_kb("VmRSS")
    config = RunnerConfig(model_name="m", model_dir=model_dir, dtype=dtype, max_batch=1,
                          context_length=512)
    (decoder, tokenizer, kv, limits, prefix), ready = load(config)
    sched = Scheduler(decoder, tokenizer, kv, limits, lambda event: None, compiled=True,
                      prefix_cache=prefix)
    sched.submit(GenerationRequest(id="r", model="m", prompt_tokens=list(range(10, 74)),
                                   sampling=SamplingParams(max_tokens=tokens, temperature=0.0)))
    while not sched.idle:
        sched.step()
    peak = _rss_kb("VmHWM")
    return {"grown_kb": peak - before, "weight_bytes": ready.weight_bytes, "dtype": ready.dtype}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each decode figure")
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per run")
    args = parser.parse_args()
    began = time.monotonic()
    model_dir = str(smollm2_4bit_dir())
    env, threads = runner_env(gemv=True)
    emit("openblas_threads", threads)
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_start", pressure if pressure is not None else "n/a", 1)

    grown = {dtype: call_in_subprocess("bench.models:rss_worker",
                                       {"model_dir": model_dir, "dtype": dtype, "tokens": 32},
                                       env)
             for dtype in ("keep", "float32")}
    for dtype, result in grown.items():
        emit(f"rss_grown_mb_{dtype}", result["grown_kb"] / 1024, 1)
        emit(f"weight_mb_{dtype}", result["weight_bytes"] / 2**20, 1)
    emit("kept4bit_rss_vs_f32", grown["keep"]["grown_kb"] / grown["float32"]["grown_kb"])

    rates: dict[str, list[float]] = {"flock": [], "mlxlm": []}
    ids: dict[str, list[int]] = {}
    workers = {
        "flock": ("bench.decode:flock_worker", {"model_dir": model_dir, "tokens": args.tokens,
                                                "streams": 1, "optimised": True}),
        "mlxlm": ("bench.decode:mlxlm_worker", {"model_dir": model_dir, "tokens": args.tokens}),
    }
    for round_index in range(args.rounds):
        order = list(workers) if round_index % 2 == 0 else list(reversed(workers))
        for name in order:
            target, kwargs = workers[name]
            result = call_in_subprocess(target, kwargs, env)
            rates[name].append(result["tok_s"])
            ids[name] = result["ids"][0] if name == "flock" else result["ids"]
    flock, mlxlm = median(rates["flock"]), median(rates["mlxlm"])
    emit("kept4bit_decode_tok_s_flock", flock)
    emit("kept4bit_decode_tok_s_mlxlm", mlxlm)
    emit("kept4bit_decode_vs_mlxlm", flock / mlxlm)
    # flock's history excludes nothing mlx-lm yields: both start at the first generated token.
    emit("kept4bit_greedy_ids_equal", ids["flock"] == ids["mlxlm"][:len(ids["flock"])])
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_end", pressure if pressure is not None else "n/a", 1)
    emit("bench_seconds", time.monotonic() - began, 0)


if __name__ == "__main__":
    main()

"""Decode speed of SmolLM2-135M f32: flock's decoder with and without its optimisations, against
mlx-lm on OpenBLAS and llama.cpp on the same weights.

Run from the repository root: `python -m bench.decode [--rounds 3] [--tokens 128]`. Every
configuration runs in its own process with the environment flock's runners get (the flockblas
shim preloaded, `OPENBLAS_NUM_THREADS` as `runner_environment` sets it); one round runs each
configuration once, the order rotating from round to round, and the figures are medians over the
rounds. The prompt is a 64-token chat prompt, decoding is greedy for `--tokens` tokens with EOS
ignored, and every process warms up (compiles its step) before it is timed.

- `mlxlm_openblas`: mlx-lm's `generate_step` in-process, sgemv fast path off (FLOCK_BLAS_GEMV=0).
- `flock`: flock's decoder through `agent.runtime.scheduler.Scheduler` (the serving path without
  the runner's IPC) with fused projections, the compiled decode step and the sgemv fast path.
- `flock_noopt`: the same with `fuse_projections=False`, `compile_step=False`, FLOCK_BLAS_GEMV=0
  and no lookahead decode.
- `batch8_opt` / `batch8_noopt`: 8 concurrent streams of the same prompt; aggregate tok/s over
  the steps where all 8 decode.
- `llamacpp`: `llama-bench` on the f32 GGUF (bench/llamacpp.py), same thread count.

Decode tok/s counts the tokens after the first (which comes from the prompt's prefill) over the
time from the first token to the last. Prints `name: value` lines only; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import (
    WorkerFailed,
    call_in_subprocess,
    cpu_pressure,
    emit,
    median,
    mlxlm_timed_greedy,
    runner_env,
    smollm2_f32_dir,
)

PROMPT = (
    "Explain in a few sentences why the sky is blue during the day and red at sunset, for a "
    "curious ten year old who likes science and asks lots of good questions."
)
WARMUP_TOKENS = 16
BATCH = 8


def prompt_ids(tokenizer: Any) -> list[int]:
    """The chat-templated prompt (64 tokens with SmolLM2's template)."""
    messages = [{"role": "user", "content": PROMPT}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _blas() -> str:
    from agent.runtime.blas import describe_blas

    return describe_blas()


# ---- workers (each runs in its own process) ----------------------------------------------------
def mlxlm_worker(model_dir: str, tokens: int) -> dict[str, Any]:
    """mlx-lm's own generation loop, greedy; decode tok/s and the token ids."""
    from mlx_lm.utils import load

    model, tokenizer = load(Path(model_dir))
    prompt = prompt_ids(tokenizer)
    tok_s, ids = mlxlm_timed_greedy(model, prompt, tokens, WARMUP_TOKENS)
    return {"tok_s": tok_s, "ids": ids, "prompt_tokens": len(prompt),
            "blas": _blas()}


def flock_worker(model_dir: str, tokens: int, streams: int, optimised: bool) -> dict[str, Any]:
    """`streams` greedy requests of the prompt through flock's scheduler; aggregate decode tok/s
    over the steps where all of them decode, and each stream's token ids."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from agent.generation import Finished, GenerationEvent, GenerationRequest, SamplingParams
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import load_decoder
    from agent.runtime.scheduler import Scheduler, SchedulerLimits

    path = Path(model_dir)
    tokenizer = load_tokenizer(path)
    prompt = prompt_ids(tokenizer)
    dec = load_decoder(path, fuse=optimised)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
    events: list[GenerationEvent] = []
    sched = Scheduler(dec, tokenizer, kv, SchedulerLimits(), events.append, compiled=optimised)
    sched.eos_ids = set()  # always decode `tokens` tokens
    if not optimised:
        sched.compute.lazy_decode = False  # type: ignore[misc]  # no lookahead either

    def submit(tag: str, max_tokens: int) -> list[str]:
        ids = [f"{tag}{i}" for i in range(streams)]
        for rid in ids:
            sched.submit(GenerationRequest(
                id=rid, model="smollm2", prompt_tokens=prompt,
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0)))
        return ids

    submit("warmup", WARMUP_TOKENS)  # compiles the step for every batch size on the way
    while not sched.idle:
        sched.step()
    events.clear()
    rids = submit("run", tokens)
    seqs: dict[str, Any] = {}
    started = None
    generated_at_start = 0
    elapsed = 0.0
    while not sched.idle:
        sched.step()
        seqs.update({rid: sched.running[rid] for rid in rids if rid in sched.running})
        if started is None and len(seqs) == streams and all(
                s.generated >= 1 for s in seqs.values()):
            started = time.perf_counter()
            generated_at_start = sched.stats.generated_tokens_total
        elif started is not None and any(isinstance(e, Finished) for e in events):
            elapsed = time.perf_counter() - started
            break
    decoded = sched.stats.generated_tokens_total - generated_at_start
    while not sched.idle:
        sched.step()
    return {"tok_s": decoded / elapsed, "ids": [seqs[rid].sampler.history for rid in rids],
            "blas": _blas()}


# ---- the driver --------------------------------------------------------------------------------
def _configs(model_dir: str, tokens: int) -> dict[str, tuple[str, dict[str, Any], bool]]:
    """name -> (worker, kwargs, sgemv fast path)."""
    def flock(streams: int, optimised: bool) -> dict[str, Any]:
        return {"model_dir": model_dir, "tokens": tokens, "streams": streams,
                "optimised": optimised}

    return {
        "mlxlm_openblas": ("bench.decode:mlxlm_worker",
                           {"model_dir": model_dir, "tokens": tokens}, False),
        "flock": ("bench.decode:flock_worker", flock(1, True), True),
        "flock_noopt": ("bench.decode:flock_worker", flock(1, False), False),
        "batch8_opt": ("bench.decode:flock_worker", flock(BATCH, True), True),
        "batch8_noopt": ("bench.decode:flock_worker", flock(BATCH, False), False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per stream")
    parser.add_argument("--threads", type=int, help="OpenBLAS threads (default: as runners)")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    args = parser.parse_args()

    began = time.monotonic()
    model_dir = str(smollm2_f32_dir())
    configs = _configs(model_dir, args.tokens)
    envs = {gemv: runner_env(gemv=gemv, threads=args.threads) for gemv in (False, True)}
    threads = envs[True][1]
    emit("openblas_threads", threads)
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_start", pressure if pressure is not None else "n/a", 1)
    emit("decoded_tokens", args.tokens)

    llama: Any = None
    llama_problem = "skipped (--no-llamacpp)" if args.no_llamacpp else None
    if not args.no_llamacpp:
        from bench import llamacpp

        try:
            llama = llamacpp.prepare()
        except llamacpp.LlamaCppUnavailable as e:
            llama_problem = str(e)

    names = [*configs, "llamacpp"] if llama is not None else list(configs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    ids: dict[str, list[Any]] = {name: [] for name in configs}
    blas: dict[str, str] = {}
    failures: dict[str, str] = {}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in failures:
                continue
            if name == "llamacpp":
                from bench import llamacpp

                try:
                    rates[name].append(median(llamacpp.decode_tok_s(
                        *llama, threads=threads, tokens=args.tokens, runs=3)))
                except llamacpp.LlamaCppUnavailable as e:
                    failures[name] = llama_problem = str(e)
                continue
            target, kwargs, gemv = configs[name]
            try:
                result = call_in_subprocess(target, kwargs, envs[gemv][0])
            except WorkerFailed as e:
                failures[name] = str(e).replace("\n", " | ")
                continue
            rates[name].append(result["tok_s"])
            ids[name].append(result["ids"])
            blas[name] = result["blas"]
            if "prompt_tokens" in result:
                blas["prompt_tokens"] = str(result["prompt_tokens"])

    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_end", pressure if pressure is not None else "n/a", 1)
    emit("prompt_tokens", blas.pop("prompt_tokens", "?"))
    for name, text in blas.items():
        emit(f"blas_{name}", text)
    for name, error in failures.items():
        emit(f"{name}_failed", error)

    def rate(name: str) -> float | None:
        return median(rates[name]) if rates.get(name) else None

    def show(name: str, key: str) -> None:
        value = rate(name)
        emit(key, value if value is not None else "unavailable", 1)
        if rates.get(name):
            emit(f"{key}_runs", " ".join(f"{r:.1f}" for r in rates[name]))

    def ratio(key: str, top: str, bottom: str) -> None:
        a, b = rate(top), rate(bottom)
        emit(key, a / b if a is not None and b else "unavailable")

    show("mlxlm_openblas", "mlxlm_openblas_decode_tok_s")
    show("flock", "flock_decode_tok_s")
    show("flock_noopt", "flock_noopt_decode_tok_s")
    if llama is not None and rates["llamacpp"]:
        emit("llamacpp_source", llama[0].source)
        show("llamacpp", "llamacpp_decode_tok_s")
    else:
        emit("llamacpp_decode_tok_s", f"unavailable ({llama_problem})")
    ratio("decode_vs_mlxlm_openblas", "flock", "mlxlm_openblas")
    ratio("decode_vs_llamacpp", "flock", "llamacpp")
    ratio("flock_opt_vs_noopt", "flock", "flock_noopt")
    show("batch8_opt", "batch8_opt_tok_s")
    show("batch8_noopt", "batch8_noopt_tok_s")
    ratio("batch8_opt_vs_noopt", "batch8_opt", "batch8_noopt")

    # Greedy ids: every run of every configuration must produce the same tokens.
    singles = [run[0] if name.startswith(("flock", "batch")) else run
               for name in ("mlxlm_openblas", "flock", "flock_noopt") for run in ids[name]]
    batched = [row for name in ("batch8_opt", "batch8_noopt") for run in ids[name]
               for row in run]
    complete = all(ids[name] for name in ("mlxlm_openblas", "flock", "flock_noopt"))
    same = complete and all(s == singles[0] for s in singles)
    emit("greedy_ids_identical", same)
    emit("batch8_greedy_ids_identical",
         bool(singles and batched) and all(b == singles[0] for b in batched))
    if singles and not same:
        first = {name: ids[name][0][0] if name != "mlxlm_openblas" else ids[name][0]
                 for name in ("mlxlm_openblas", "flock", "flock_noopt") if ids[name]}
        for name, run in first.items():
            diverge = next((i for i, (a, b) in enumerate(zip(run, singles[0], strict=False))
                            if a != b), None)
            emit(f"first_divergence_{name}", diverge if diverge is not None else "none")
    emit("bench_seconds", time.monotonic() - began, 0)


if __name__ == "__main__":
    main()

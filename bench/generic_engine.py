"""Decode speed of a model on the mlx-lm engine: flock's runner against mlx-lm in-process.

Run from the repository root: `python -m bench.generic_engine [--rounds 3] [--tokens 128]`.
The model is gemma3_text with random weights at about SmolLM2-135M's size (hidden 576, 30
layers, 9 heads of 64, 3 KV heads, MLP 1536, SmolLM2's 49,152-token vocabulary, float32), built
once with mlx-lm's own model class and cached. Its special tokens' embedding rows are zero, so
greedy decoding never ends early on an end-of-text token.

- `mlxlm`: mlx-lm's `generate_step` in a fresh process with the environment flock's runners get
  (BLAS shim, sgemv fast path).
- `flock`: a real runner process (`RunnerProcess`, same environment) serving one greedy request;
  decode tok/s is measured by the client from the first streamed token to the last, so IPC and
  detokenizing are included.

Both warm up first; one round runs each once, alternating which goes first, and figures are
medians over rounds. Prints `name: value` lines, `generic_decode_vs_mlxlm` among them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CACHE,
    call_in_subprocess,
    cpu_pressure,
    emit,
    median,
    mlxlm_timed_greedy,
    runner_env,
    save_random_model,
)

MODEL_NAME = "gemma3-text-random-135m-v1"
PROMPT = [100 + (i * 7919) % 48000 for i in range(64)]
WARMUP_TOKENS = 16


def model_dir() -> Path:
    """The random gemma3_text directory (built once, cached)."""
    out = CACHE / "models" / MODEL_NAME
    if (out / "config.json").exists():
        return out
    from mlx_lm.models import gemma3_text

    args = gemma3_text.ModelArgs.from_dict({
        "model_type": "gemma3_text", "hidden_size": 576, "num_hidden_layers": 30,
        "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64,
        "num_key_value_heads": 3, "vocab_size": 49152, "query_pre_attn_scalar": 64,
        "sliding_window": 512, "sliding_window_pattern": 6, "max_position_embeddings": 8192,
    })
    return save_random_model(gemma3_text, args, out)


def _blas() -> str:
    from agent.runtime.blas import describe_blas

    return describe_blas()


def mlxlm_worker(model_dir: str, tokens: int) -> dict[str, Any]:
    """mlx-lm's own generation loop, greedy: decode tok/s and the ids."""
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir))
    tok_s, ids = mlxlm_timed_greedy(model, PROMPT, tokens, WARMUP_TOKENS)
    return {"tok_s": tok_s, "ids": ids,
            "blas": _blas()}


async def _flock_run(directory: Path, tokens: int, env: dict[str, str]) -> dict[str, Any]:
    from agent.generation import Finished, GenerationRequest, SamplingParams, TokenChunk
    from agent.runtime.client import RunnerProcess
    from agent.runtime.protocol import RunnerConfig

    runner = RunnerProcess(RunnerConfig(model_name="generic", model_dir=str(directory)), env)
    ready = await runner.start(timeout=600)
    try:
        async def one(rid: str, max_tokens: int) -> tuple[list[int], float, str]:
            request = GenerationRequest(id=rid, model="generic", prompt_tokens=PROMPT,
                                        sampling=SamplingParams(max_tokens=max_tokens,
                                                                temperature=0.0))
            ids: list[int] = []
            first_ids, first_at, reason = 0, 0.0, "?"
            async for event in runner.generate(request):
                if isinstance(event, TokenChunk) and event.token_ids:
                    if not ids:
                        first_ids, first_at = len(event.token_ids), time.perf_counter()
                    ids += event.token_ids
                elif isinstance(event, Finished):
                    reason = event.reason
            rate = (len(ids) - first_ids) / (time.perf_counter() - first_at)
            return ids, rate, reason

        await one("warmup", WARMUP_TOKENS)
        ids, rate, reason = await one("run", tokens)
    finally:
        await runner.stop()
    return {"tok_s": rate, "ids": ids, "engine": ready.engine, "reason": reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens")
    args = parser.parse_args()

    directory = model_dir()
    env, threads = runner_env(gemv=True)
    emit("openblas_threads", threads)
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_start", pressure if pressure is not None else "n/a", 1)
    rates: dict[str, list[float]] = {"mlxlm": [], "flock": []}
    ids: dict[str, list[list[int]]] = {"mlxlm": [], "flock": []}
    for round_index in range(args.rounds):
        order = ["mlxlm", "flock"] if round_index % 2 == 0 else ["flock", "mlxlm"]
        for name in order:
            if name == "mlxlm":
                result = call_in_subprocess("bench.generic_engine:mlxlm_worker",
                                            {"model_dir": str(directory),
                                             "tokens": args.tokens}, env)
                emit("blas", result["blas"])
            else:
                result = asyncio.run(_flock_run(directory, args.tokens, env))
                emit("flock_engine", result["engine"])
                emit("flock_finish_reason", result["reason"])
            rates[name].append(result["tok_s"])
            ids[name].append(result["ids"])
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_end", pressure if pressure is not None else "n/a", 1)
    emit("decoded_tokens", args.tokens)
    for name in rates:
        emit(f"generic_{name}_decode_tok_s", median(rates[name]), 1)
        emit(f"generic_{name}_decode_tok_s_runs", " ".join(f"{r:.1f}" for r in rates[name]))
    emit("generic_greedy_ids_identical",
         all(run == ids["mlxlm"][0] for name in ids for run in ids[name]))
    emit("generic_decode_vs_mlxlm", median(rates["flock"]) / median(rates["mlxlm"]))


if __name__ == "__main__":
    main()

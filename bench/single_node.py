"""Single-node figures of the foundation issue, measured side by side in one run.

    .venv/bin/python -m bench.single_node [--rounds 3] [--tokens 128] [--blas-threads N]
                                          [--models-dir DIR]

Prints `name: value` lines:
  api_decode_vs_mlxlm       decode tok/s through the streaming HTTP API / mlx-lm in-process with
                            the same BLAS as flock's runners
  ttft_overhead_ms          time to first token through the API minus mlx-lm's (same BLAS), for a
                            ~64-token chat prompt neither has seen
  batch8_vs_1               aggregate decode tok/s of 8 concurrent API streams / one stream
  prefill_vs_default_mlxlm  prompt tok/s of a ~512-token prompt through the API / mlx-lm default
                            install (no BLAS shim)
  decode_vs_default_mlxlm   decode tok/s / mlx-lm default install
  prefix_cache_hits_during_timing  prefix-cache hits the agent's runner counted while the timed
                            requests ran (flock_prefix_cache_hits_total from /metrics), beside
                            cached_prompt_tokens_during_timing (the usage's cached_tokens, summed)
Every timed request carries a prompt that starts with a tag made for it (round, kind, random
hex) in its own system message, so the prefix cache has nothing to serve it: the figures are
prefill, not cache hits. Warm-ups (shape compilation) use other prompts of the same lengths
(mlx-lm: one as long as the short prompt). Each
mlx-lm figure runs in its own subprocess (the BLAS preload is process-wide); rounds alternate
which side goes first, and medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    SMOLLM2_MODEL,
    bench_agent,
    bench_models,
    call_in_subprocess,
    chat_body,
    emit,
    stream_chat_async,
    warn_if_busy,
)
from tests.live_agent import metric_total, wait_until

MODEL = SMOLLM2_MODEL
SHORT, LONG, BATCH = 64, 512, 8  # prompt tokens (about), concurrent streams


# ---- prompts -------------------------------------------------------------------------------------
def chat_prompt(tokenizer: Any, words: int, tag: str) -> tuple[list[dict[str, str]], list[int]]:
    """A chat whose token ids start with `tag` right after the template's first three tokens
    (the prefix cache needs 16 shared tokens to hit), and end in a long task."""
    text = " ".join(f"item{i}" for i in range(words))
    messages = [{"role": "system", "content": f"Session {tag}. You are a helpful assistant."},
                {"role": "user", "content": f"Repeat this list back, then count to 300: {text}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return messages, list(ids)


def fit_prompt(tokenizer: Any, target: int, tag: str
               ) -> tuple[list[dict[str, str]], list[int]]:
    """`chat_prompt` with at least `target` tokens, a few over at most (the frame alone is ~40
    tokens and each item ~4: grow the list in steps that cannot overshoot far)."""
    words = 1
    while True:
        messages, ids = chat_prompt(tokenizer, words, tag)
        if len(ids) >= target or words > 10 * target:
            return messages, ids
        words += max(1, (target - len(ids)) // 5)


def new_tag(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(4)}"


# ---- mlx-lm (subprocess worker) ------------------------------------------------------------------
def mlxlm_worker(model_dir: str, warm: list[list[int]], prompts: dict[str, list[int]],
                 tokens: int) -> dict[str, dict[str, float]]:
    """Per prompt: seconds to the first token (prefill and one argmax) and, over `tokens` more
    greedy steps (the "short" prompt only), decode tok/s. The `warm` prompts (other ids) run
    first."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir))

    def run(ids: list[int], n: int) -> dict[str, float]:
        cache = make_prompt_cache(model)
        started = time.perf_counter()
        token = mx.argmax(model(mx.array([ids]), cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(n):
            token = mx.argmax(model(token[None], cache=cache)[:, -1], axis=-1)
            mx.eval(token)
        return {"ttft_s": ttft, "decode_tok_s": n / (time.perf_counter() - started) if n else 0.0}

    for ids in warm:
        run(ids, 4)
    return {name: run(ids, tokens if name == "short" else 0) for name, ids in prompts.items()}


def mlxlm(model_dir: Path, tokenizer: Any, round_tag: str, prompts: dict[str, list[int]],
          tokens: int, env: dict[str, str]) -> dict[str, dict[str, float]]:
    # One warm-up prompt as long as the short one: mlx-lm's model is not compiled per shape on
    # the CPU, so it readies the kernels; a second long prefill would double the slowest part.
    warm = [fit_prompt(tokenizer, len(prompts["short"]), new_tag(f"{round_tag}-mlxwarm"))[1]]
    return call_in_subprocess(  # type: ignore[no-any-return]
        "bench.single_node:mlxlm_worker",
        {"model_dir": str(model_dir), "warm": warm, "prompts": prompts, "tokens": tokens}, env,
        timeout=1200)


def runner_env(state_dir: Path, *, blas: str, threads: int | None) -> dict[str, str]:
    """The environment a flock runner gets, with the BLAS shim (`auto`) or without (`off`), and
    `threads` OpenBLAS threads (None: flock's default)."""
    from agent.runtime.environment import runner_environment
    from agent.settings import NodeSettings

    settings = NodeSettings(state_dir=state_dir, blas=blas, blas_threads=threads)  # type: ignore[arg-type]
    env, _ = runner_environment(settings)
    return env


# ---- the API -------------------------------------------------------------------------------------
class ApiRound:
    """One round of API figures on fresh prompts; counts what it timed for the cache check."""

    def __init__(self, url: str, tokenizer: Any, tokens: int) -> None:
        self.url, self.tokenizer, self.tokens = url, tokenizer, tokens
        self.timed = 0
        self.cached_tokens = 0
        self.prompt_tokens: dict[str, int] = {}

    def prompt(self, target: int, tag: str) -> list[dict[str, str]]:
        return fit_prompt(self.tokenizer, target, tag)[0]

    async def warm_up(self) -> None:
        """Compile the shapes the rounds meet, with prompts no round uses."""
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:
            await stream_chat_async(client, chat_body(MODEL, self.prompt(SHORT, new_tag("warm")),
                                                      8))
            await stream_chat_async(client, chat_body(MODEL, self.prompt(LONG, new_tag("warm")),
                                                      1))
            await asyncio.gather(*(stream_chat_async(
                client, chat_body(MODEL, self.prompt(SHORT, new_tag("warm")), 8))
                for _ in range(BATCH)))

    async def figures(self, round_tag: str) -> dict[str, float]:
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:
            one = await self._timed(client, self.prompt(SHORT, new_tag(f"{round_tag}-short")),
                                    self.tokens, "short")
            long = await self._timed(client, self.prompt(LONG, new_tag(f"{round_tag}-long")), 1,
                                     "long")
            started = time.perf_counter()
            results = await asyncio.gather(*(self._timed(
                client, self.prompt(SHORT, new_tag(f"{round_tag}-batch{i}")), self.tokens,
                "batch") for i in range(BATCH)))
            elapsed = time.perf_counter() - started
        # Aggregate decode rate: tokens after each stream's first, over the shared wall time
        # minus the longest time to first token.
        produced = sum(max(0, r.tokens - 1) for r in results)
        batch = produced / max(1e-9, elapsed - max(r.ttft_s for r in results))
        return {"ttft_s": one.ttft_s, "decode_tok_s": one.decode_tok_s,
                "prefill_tok_s": long.prompt_tokens / long.ttft_s, "batch8_tok_s": batch}

    async def _timed(self, client: httpx.AsyncClient, messages: list[dict[str, str]], n: int,
                     kind: str) -> Any:
        timing = await stream_chat_async(client, chat_body(MODEL, messages, n))
        self.timed += 1
        self.cached_tokens += timing.cached_tokens
        self.prompt_tokens[kind] = timing.prompt_tokens
        return timing


def prefix_lookups(url: str) -> tuple[float, float]:
    """(prefix-cache hits, misses) the agent's runners reported so far."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return (metric_total(text, "flock_prefix_cache_hits_total"),
            metric_total(text, "flock_prefix_cache_misses_total"))


# ---- driver --------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per stream")
    parser.add_argument("--models-dir", type=Path,
                        help="model store to pull SmolLM2 into (default: the tests' import, "
                             "else ~/.cache/flock-bench/models)")
    parser.add_argument("--blas-threads", type=int,
                        help="OpenBLAS threads of the agent's runner and of mlx-lm alike "
                             "(default: flock's); 1 on a machine shared with other work, where "
                             "waiting threads collapse")
    args = parser.parse_args()
    warn_if_busy()
    models_dir, model_dir = bench_models(args.models_dir)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="flock-single-node-") as tmp:
        state = Path(tmp)
        same_blas = runner_env(state, blas="auto", threads=args.blas_threads)
        default = runner_env(state, blas="off", threads=args.blas_threads)
        emit("openblas_threads", same_blas.get("OPENBLAS_NUM_THREADS", "?"))
        threads = ["--blas-threads", str(args.blas_threads)] if args.blas_threads else []
        agent = bench_agent(state / "agent", MODEL, models_dir=models_dir,
                            args=["--metrics", *threads])
        try:
            api = ApiRound(agent.url, tokenizer, args.tokens)
            asyncio.run(api.warm_up())
            hits0, misses0 = prefix_lookups(agent.url)
            for index in range(args.rounds):
                round_tag = f"r{index}"
                prompts = {"short": fit_prompt(tokenizer, SHORT, new_tag(f"{round_tag}-mshort"))[1],
                           "long": fit_prompt(tokenizer, LONG, new_tag(f"{round_tag}-mlong"))[1]}
                measured: dict[str, Any] = {}
                order = ["api", "mlx"] if index % 2 == 0 else ["mlx", "api"]
                for side in order:
                    if side == "api":
                        measured["api"] = asyncio.run(api.figures(round_tag))
                    else:
                        measured["same"] = mlxlm(model_dir, tokenizer, round_tag, prompts,
                                                 args.tokens, same_blas)
                        measured["plain"] = mlxlm(model_dir, tokenizer, round_tag, prompts,
                                                  args.tokens, default)
                a, same, plain = measured["api"], measured["same"], measured["plain"]
                for key, value in {
                    "api_decode_tok_s": a["decode_tok_s"],
                    "api_ttft_ms": a["ttft_s"] * 1000,
                    "api_prefill_tok_s": a["prefill_tok_s"],
                    "api_batch8_tok_s": a["batch8_tok_s"],
                    "mlxlm_decode_tok_s": same["short"]["decode_tok_s"],
                    "mlxlm_ttft_ms": same["short"]["ttft_s"] * 1000,
                    "mlxlm_prefill_tok_s": len(prompts["long"]) / same["long"]["ttft_s"],
                    "default_mlxlm_decode_tok_s": plain["short"]["decode_tok_s"],
                    "default_mlxlm_prefill_tok_s": len(prompts["long"]) / plain["long"]["ttft_s"],
                }.items():
                    rows.setdefault(key, []).append(value)
            # The runner reports its counters about once a second: wait until it has counted
            # one lookup (hit or miss) for every timed request.
            def counted() -> float | None:
                hits, misses = prefix_lookups(agent.url)
                return hits - hits0 + 1 if hits + misses - hits0 - misses0 >= api.timed else None

            hits = int(wait_until(counted, 30, "the runner's prefix-cache counters") - 1)
        finally:
            agent.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    emit("prompt_tokens", api.prompt_tokens.get("short", 0))
    emit("long_prompt_tokens", api.prompt_tokens.get("long", 0))
    emit("timed_requests", api.timed)
    emit("prefix_cache_hits_during_timing", hits)
    emit("cached_prompt_tokens_during_timing", api.cached_tokens)
    if hits or api.cached_tokens:
        print("# warning: timed requests were served from the prefix cache", file=sys.stderr)
    for key, value in med.items():
        emit(key, value)
    emit("api_decode_vs_mlxlm", med["api_decode_tok_s"] / med["mlxlm_decode_tok_s"])
    emit("ttft_overhead_ms", med["api_ttft_ms"] - med["mlxlm_ttft_ms"], 1)
    emit("batch8_vs_1", med["api_batch8_tok_s"] / med["api_decode_tok_s"])
    emit("prefill_vs_mlxlm", med["api_prefill_tok_s"] / med["mlxlm_prefill_tok_s"])
    emit("prefill_vs_default_mlxlm",
         med["api_prefill_tok_s"] / med["default_mlxlm_prefill_tok_s"])
    emit("decode_vs_default_mlxlm",
         med["api_decode_tok_s"] / med["default_mlxlm_decode_tok_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

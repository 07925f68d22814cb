"""Long-context figures of the long-conversations issue (prefix cache, chunked prefill, decode at
long context), SmolLM2-135M f32, flock against mlx-lm on the same BLAS.

    .venv/bin/python -m bench.long_context [--rounds 3] [--chunks 128,512] [--tokens 64]

Where each figure comes from:
- flock decode and prefill figures: a real runner process (agent.runtime.client.RunnerProcess,
  the environment `runner_environment` gives runners, default RunnerConfig but the prefill
  chunk); token times are taken as the events arrive over the runner's pipe.
- `turn2_vs_turn1_ttft`: a real agent (`python -m agent run`, discovery off) through the
  streaming OpenAI chat API.
- mlx-lm: its own model and KV cache in a subprocess with exactly the runners' environment
  (same BLAS shim and threads); prompts prefilled in 2,048-token steps as `generate_step` does.
Rounds alternate flock and mlx-lm; figures are medians over rounds. Every prompt starts with a
token sequence unique to its measurement, so nothing is served from the prefix cache unless the
figure is about the prefix cache. Decode counts the tokens after the first (which comes out of
the prefill) over the time from the first token to the last; prompts end in a counting task so
greedy decoding does not stop early, and both sides decode the same prompt ids.

Prints `name: value` lines:
  turn2_vs_turn1_ttft          TTFT of turn 2 (2,000 tokens of history, cached) / turn 1
  ctx4k_decode_ratio_vs_mlxlm  (flock decode tok/s at 4,000 / at 200) / mlx-lm's same ratio
  ctx4k_vs_200_decode          flock decode tok/s at 4,000 / at 200
  prefill_gap_vs_median        largest gap between a running stream's arrivals while another
                               request prefills 4,000 tokens / its median gap, default settings
                               (slices sized to take at most prefill_gap_steps decode steps)
  prefill_gap_vs_median_chunk<N>, prefill_while_decoding_tok_s_chunk<N>: the same gap ratio and
                               the 4,000-token prefill's tok/s with fixed N-token slices
                               (`--chunks`), and prefill_while_decoding_tok_s_default: the
                               trade-off
  prefill4k_vs_mlxlm           prefill tok/s at 4,000 tokens alone, flock / mlx-lm
and the raw tok/s and seconds behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    bench_agent,
    call_in_subprocess,
    chat_body,
    emit,
    median,
    smollm2_f32_dir,
    stream_chat_async,
    warn_if_busy,
)

SHORT_CONTEXT = 200
LONG_CONTEXT = 4000
HISTORY = 2000
DEFAULT_CHUNK = 0  # the runner's defaults: time-sized slices (prefill_gap_steps), at most 512
STREAM_TOKENS_AROUND = 12  # tokens of the running stream kept before and after the prefill


# ---- prompts -----------------------------------------------------------------------------------
def _tokenizer(model_dir: Path) -> Any:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(model_dir)


def filler(tokenizer: Any, tokens: int, tag: str) -> list[int]:
    """`tokens` token ids of numbered notes mentioning `tag`."""
    words = " " + " ".join(f"note {i} says {i * 13 % 97} for {tag}." for i in range(tokens))
    ids = tokenizer.encode(words, add_special_tokens=False)
    assert len(ids) >= tokens
    return list(ids[:tokens])


def counting_prompt(tokenizer: Any, length: int, tag: str) -> list[int]:
    """Exactly `length` token ids of raw text (no chat template): `tag` first, so the prompt is
    new to every cache, numbered notes as filler, then a count from 1 to 20 that greedy decoding
    continues for hundreds of tokens without an end-of-sequence token (SmolLM2 instruct)."""
    head = tokenizer.encode(f"Session {tag}. Notes follow.", add_special_tokens=False)
    numbers = ", ".join(str(i) for i in range(1, 21))
    tail = tokenizer.encode(f" Now the numbers: {numbers},", add_special_tokens=False)
    room = length - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"a {length}-token prompt is shorter than its frame")
    return list(head) + filler(tokenizer, room, tag) + list(tail)


# ---- mlx-lm (subprocess worker) ------------------------------------------------------------------
def mlxlm_worker(model_dir: str, prompts: dict[str, list[int]], tokens: int) -> dict[str, Any]:
    """Per prompt: prefill seconds (2,048-token steps, as mlx-lm's generate_step) and decode
    tok/s over `tokens` greedy tokens; the first prompt is a warm-up and is measured again."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir))

    def run(prompt: list[int]) -> dict[str, Any]:
        cache = make_prompt_cache(model)
        started = time.perf_counter()
        rest = prompt
        while len(rest) > 2048:
            model(mx.array([rest[:2048]]), cache=cache)
            mx.eval([c.state for c in cache])
            rest = rest[2048:]
        token = mx.argmax(model(mx.array([rest]), cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        prefill_s = time.perf_counter() - started
        ids = [int(token.item())]
        started = time.perf_counter()
        for _ in range(tokens - 1):
            token = mx.argmax(model(token[None], cache=cache)[:, -1], axis=-1)
            mx.eval(token)
            ids.append(int(token.item()))
        decode_s = time.perf_counter() - started
        return {"prefill_s": prefill_s, "decode_tok_s": (tokens - 1) / decode_s, "ids": ids}

    first = next(iter(prompts.values()))
    run(first[:64])  # warm-up
    return {name: run(prompt) for name, prompt in prompts.items()}


# ---- flock runner --------------------------------------------------------------------------------
def _runner(model_dir: Path, env: dict[str, str], chunk: int) -> Any:
    from agent.runtime.client import RunnerProcess
    from agent.runtime.protocol import RunnerConfig

    if chunk == DEFAULT_CHUNK:
        return RunnerProcess(RunnerConfig(model_name="smollm2", model_dir=str(model_dir)), env)
    return RunnerProcess(RunnerConfig(model_name="smollm2", model_dir=str(model_dir),
                                      prefill_chunk=chunk, prefill_gap_steps=0), env)


def _request(rid: str, prompt: list[int], max_tokens: int) -> Any:
    from agent.generation import GenerationRequest, SamplingParams

    return GenerationRequest(id=rid, model="smollm2", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def _timed(runner: Any, request: Any, stamps: list[float] | None = None
                 ) -> tuple[float, float, list[float], list[int]]:
    """(submit time, time of the first event, arrival time of each streamed token, token ids)
    of one request run to its end. A token whose text the detokenizer holds back is streamed
    with a later one (or not at all when it is the last): the first event, not the first
    stamp, marks the end of the prefill."""
    from agent.generation import Failed, TokenChunk

    stamps = [] if stamps is None else stamps
    ids: list[int] = []
    submitted = time.perf_counter()
    first = 0.0
    async for event in runner.generate(request):
        now = time.perf_counter()
        first = first or now
        if isinstance(event, TokenChunk) and event.token_ids:
            stamps.extend([now] * len(event.token_ids))
            ids.extend(event.token_ids)
        elif isinstance(event, Failed):
            raise RuntimeError(f"{request.id} failed: {event.message}")
    return submitted, first, stamps, ids


async def flock_alone(runner: Any, prompt: list[int], tokens: int, rid: str) -> dict[str, Any]:
    """Prefill seconds (submit to first token) and decode tok/s of one request alone."""
    submitted, first, stamps, ids = await _timed(runner, _request(rid, prompt, tokens))
    if len(stamps) < 2:
        raise RuntimeError(f"{rid} produced {len(stamps)} tokens")
    return {"prefill_s": first - submitted,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "ids": ids}


async def flock_gap(runner: Any, stream_prompt: list[int], long_prompt: list[int], tag: str
                    ) -> dict[str, float]:
    """A stream decodes; a 4,000-token prompt arrives and prefills. The stream's largest
    inter-token gap from STREAM_TOKENS_AROUND tokens before the arrival to as many after the
    prefill, over its median gap in the same window; and the prefill's tok/s."""
    stamps: list[float] = []
    stream = asyncio.create_task(_timed(runner, _request(f"stream-{tag}", stream_prompt, 4000),
                                        stamps))
    for _ in range(6000):
        if len(stamps) >= 2 * STREAM_TOKENS_AROUND or stream.done():
            break
        await asyncio.sleep(0.01)
    before = len(stamps)
    submitted, prefilled, _, _ = await _timed(runner, _request(f"long-{tag}", long_prompt, 1))
    for _ in range(6000):
        after = sum(1 for t in stamps if t > prefilled)
        if after >= STREAM_TOKENS_AROUND or stream.done():
            break
        await asyncio.sleep(0.01)
    stream.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stream
    window = stamps[before - STREAM_TOKENS_AROUND:]
    window = [t for t in window if t <= prefilled] + [t for t in window if t > prefilled][
        :STREAM_TOKENS_AROUND]
    # Gaps between arrivals: ids that came in one chunk (text the detokenizer held back) are
    # one arrival, as a client sees them.
    gaps = [b - a for a, b in itertools.pairwise(window) if b > a]
    if len(gaps) < 2 * STREAM_TOKENS_AROUND:
        raise RuntimeError(f"the stream ended early ({len(stamps)} tokens)")
    return {"gap_ratio": max(gaps) / median(gaps), "max_gap_s": max(gaps),
            "median_gap_s": median(gaps), "prefill_tok_s": len(long_prompt) / (
                prefilled - submitted)}


# ---- agent (turn 2 vs turn 1) --------------------------------------------------------------------
async def chat_ttft(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int
                    ) -> tuple[float, str, int]:
    """(seconds to the first streamed content, the whole reply, cached prompt tokens)."""
    timing = await stream_chat_async(client, chat_body(model, messages, max_tokens))
    return timing.ttft_s, timing.text, timing.cached_tokens


async def conversation_ttfts(url: str, model: str, tokenizer: Any, tag: str
                             ) -> dict[str, float]:
    import httpx

    history = tokenizer.decode(filler(tokenizer, HISTORY, tag))
    messages = [{"role": "system", "content": f"Conversation {tag}. {history}"},
                {"role": "user", "content": "What is note 12 about?"}]
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        ttft1, reply, _ = await chat_ttft(client, model, messages, 32)
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "And note 40?"}]
        ttft2, _, cached = await chat_ttft(client, model, messages, 32)
    return {"ttft1_s": ttft1, "ttft2_s": ttft2, "cached_tokens": cached}


# ---- driver --------------------------------------------------------------------------------------
async def flock_round(runners: dict[int, Any], prompts: dict[str, list[int]], tokens: int,
                      tokenizer: Any, round_index: int, order: list[int]
                      ) -> dict[str, float]:
    out: dict[str, float] = {}
    runner = runners[DEFAULT_CHUNK]
    for context in (SHORT_CONTEXT, LONG_CONTEXT):
        tag = f"r{round_index}c{context}"
        alone = await flock_alone(runner, counting_prompt(tokenizer, context, tag), tokens, tag)
        out[f"decode_tok_s_{context}"] = alone["decode_tok_s"]
        out[f"prefill_tok_s_{context}"] = context / alone["prefill_s"]
    for chunk in order:
        tag = f"r{round_index}k{chunk}"
        gap = await flock_gap(runners[chunk], prompts["stream"],
                              counting_prompt(tokenizer, LONG_CONTEXT, tag), tag)
        out[f"gap_ratio_{chunk}"] = gap["gap_ratio"]
        out[f"max_gap_s_{chunk}"] = gap["max_gap_s"]
        out[f"median_gap_s_{chunk}"] = gap["median_gap_s"]
        out[f"prefill_while_decoding_tok_s_{chunk}"] = gap["prefill_tok_s"]
    return out


async def flock_rounds(model_dir: Path, env: dict[str, str], chunks: list[int], rounds: int,
                       tokens: int, tokenizer: Any, mlx_env: dict[str, str]
                       ) -> tuple[list[dict[str, float]], list[dict[str, Any]], bool]:
    runners = {chunk: _runner(model_dir, env, chunk) for chunk in [DEFAULT_CHUNK, *chunks]}
    try:
        for runner in runners.values():
            ready = await runner.start()
        emit("runner_blas", ready.blas)
        warm = {"stream": counting_prompt(tokenizer, SHORT_CONTEXT, "stream")}
        # Warm-up: compile every decode shape the measurements meet.
        for context in (SHORT_CONTEXT, LONG_CONTEXT):
            await flock_alone(runners[DEFAULT_CHUNK],
                              counting_prompt(tokenizer, context, f"w{context}"), tokens,
                              f"w{context}")
        for chunk, runner in runners.items():
            await flock_gap(runner, warm["stream"],
                            counting_prompt(tokenizer, LONG_CONTEXT, f"g{chunk}"), f"g{chunk}")
        flock: list[dict[str, float]] = []
        mlxlm: list[dict[str, Any]] = []
        same_ids = True
        order = [DEFAULT_CHUNK, *chunks]
        for index in range(rounds):
            shift = index % len(order)
            mlx_first = index % 2 == 1
            prompts = {f"ctx{c}": counting_prompt(tokenizer, c, f"m{index}c{c}")
                       for c in (SHORT_CONTEXT, LONG_CONTEXT)}
            if mlx_first:
                mlxlm.append(await asyncio.to_thread(
                    call_in_subprocess, "bench.long_context:mlxlm_worker",
                    {"model_dir": str(model_dir), "prompts": prompts, "tokens": tokens},
                    mlx_env, timeout=1800))
            flock.append(await flock_round(runners, warm, tokens, tokenizer, index,
                                           order[shift:] + order[:shift]))
            if not mlx_first:
                mlxlm.append(await asyncio.to_thread(
                    call_in_subprocess, "bench.long_context:mlxlm_worker",
                    {"model_dir": str(model_dir), "prompts": prompts, "tokens": tokens},
                    mlx_env, timeout=1800))
            # The same prompt ids through flock: greedy ids agree with mlx-lm's.
            check = await flock_alone(runners[DEFAULT_CHUNK], prompts[f"ctx{SHORT_CONTEXT}"],
                                      tokens, f"check{index}")
            theirs = mlxlm[-1][f"ctx{SHORT_CONTEXT}"]["ids"]
            if check["ids"] != theirs:
                same_ids = False
                print(f"# greedy ids differ: flock {check['ids']} mlx-lm {theirs}",
                      file=sys.stderr)
        return flock, mlxlm, same_ids
    finally:
        for runner in runners.values():
            await runner.stop()


def main() -> int:
    global SHORT_CONTEXT, LONG_CONTEXT, HISTORY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement")
    parser.add_argument("--chunks", default="128,512",
                        help="other prefill chunk sizes for the gap trade-off")
    parser.add_argument("--skip-agent", action="store_true", help="no turn-2 TTFT figure")
    parser.add_argument("--short", type=int, default=SHORT_CONTEXT, help="short context")
    parser.add_argument("--long", type=int, default=LONG_CONTEXT, help="long context")
    parser.add_argument("--history", type=int, default=HISTORY, help="turn-1 history tokens")
    args = parser.parse_args()
    SHORT_CONTEXT, LONG_CONTEXT, HISTORY = args.short, args.long, args.history
    emit("contexts", f"{SHORT_CONTEXT},{LONG_CONTEXT} history {HISTORY}")
    chunks = [int(c) for c in args.chunks.split(",") if c and int(c) != DEFAULT_CHUNK]
    warn_if_busy()

    from agent.runtime.environment import runner_environment
    from agent.settings import load_settings

    model_dir = smollm2_f32_dir()
    tokenizer = _tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(state_dir=Path(tmp) / "state")
        env, warning = runner_environment(settings)
        if warning:
            print(f"# {warning}", file=sys.stderr)
        env["PYTHONPATH"] = str(ROOT)
        emit("openblas_threads", env.get("OPENBLAS_NUM_THREADS", "?"))
        emit("flock_measured_at", "runner process (RunnerProcess); turn TTFTs via HTTP API")

        ttfts: list[dict[str, float]] = []
        if not args.skip_agent:
            agent = bench_agent(Path(tmp) / "agent", str(model_dir))
            try:
                asyncio.run(conversation_ttfts(agent.url, str(model_dir), tokenizer, "warm"))
                for index in range(args.rounds):
                    ttfts.append(asyncio.run(conversation_ttfts(agent.url, str(model_dir),
                                                                tokenizer, f"t{index}")))
            finally:
                agent.stop(60)
        flock, mlxlm, same_ids = asyncio.run(flock_rounds(
            model_dir, env, chunks, args.rounds, args.tokens, tokenizer, env))

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return median(row[key] for row in rows)

    def mlx_med(context: int, key: str) -> float:
        return median(row[f"ctx{context}"][key] for row in mlxlm)

    if ttfts:
        emit("turn1_ttft_s", med(ttfts, "ttft1_s"), 3)
        emit("turn2_ttft_s", med(ttfts, "ttft2_s"), 3)
        emit("turn2_cached_tokens", int(med(ttfts, "cached_tokens")))
        emit("turn2_vs_turn1_ttft", median(r["ttft2_s"] / r["ttft1_s"] for r in ttfts), 3)
    f200 = med(flock, f"decode_tok_s_{SHORT_CONTEXT}")
    f4k = med(flock, f"decode_tok_s_{LONG_CONTEXT}")
    m200 = mlx_med(SHORT_CONTEXT, "decode_tok_s")
    m4k = mlx_med(LONG_CONTEXT, "decode_tok_s")
    emit(f"flock_decode_tok_s_{SHORT_CONTEXT}", f200)
    emit(f"flock_decode_tok_s_{LONG_CONTEXT}", f4k)
    emit(f"mlxlm_decode_tok_s_{SHORT_CONTEXT}", m200)
    emit(f"mlxlm_decode_tok_s_{LONG_CONTEXT}", m4k)
    emit("mlxlm_ctx4k_vs_200_decode", m4k / m200)
    emit("ctx4k_vs_200_decode", f4k / f200)
    emit("ctx4k_decode_ratio_vs_mlxlm", (f4k / f200) / (m4k / m200))
    emit("greedy_ids_match_mlxlm", same_ids)
    for chunk in [DEFAULT_CHUNK, *chunks]:
        suffix = "" if chunk == DEFAULT_CHUNK else f"_chunk{chunk}"
        label = "default" if chunk == DEFAULT_CHUNK else f"chunk{chunk}"
        emit(f"prefill_gap_vs_median{suffix}", med(flock, f"gap_ratio_{chunk}"))
        emit(f"max_gap_ms_{label}", 1000 * med(flock, f"max_gap_s_{chunk}"), 1)
        emit(f"median_gap_ms_{label}", 1000 * med(flock, f"median_gap_s_{chunk}"), 1)
        emit(f"prefill_while_decoding_tok_s_{label}",
             med(flock, f"prefill_while_decoding_tok_s_{chunk}"))
    flock_prefill = med(flock, f"prefill_tok_s_{LONG_CONTEXT}")
    mlx_prefill = median(LONG_CONTEXT / row[f"ctx{LONG_CONTEXT}"]["prefill_s"] for row in mlxlm)
    emit(f"flock_prefill_tok_s_{LONG_CONTEXT}", flock_prefill)
    emit(f"mlxlm_prefill_tok_s_{LONG_CONTEXT}", mlx_prefill)
    emit("prefill4k_vs_mlxlm", flock_prefill / mlx_prefill)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

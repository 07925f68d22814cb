"""Speculative decoding with a draft model (issue 14): a draft vs plain decoding, side by side.

    .venv/bin/python -m bench.speculative_draft [--rounds 3] [--tokens 96] [--quick]

Prints `name: value` lines:
  draft_greedy_ids_identical   every run with the draft produced the plain run's ids
  draft_random_chat_vs_plain   decode tok/s with a RANDOM 2-layer draft that shares SmolLM2's
                               tokenizer / plain, free chat prompts one at a time, greedy,
                               prompt lookup off in both. The draft is almost never right: this
                               measures what a useless draft costs (its proposals, the wider
                               verification passes, until drafting pauses), not a speed-up.
  draft_random_acceptance      drafted tokens kept / drafted, that random draft
  *_tok_s                      the medians behind the ratio; *_runs the per-round ratios

Both configurations run flock's scheduler in one worker process with a runner's environment,
over the same loaded SmolLM2 decoder, alternating which goes first each round. A useful draft
(a smaller model trained with SmolLM2's tokenizer) is not in the test models; with one, pass
`--draft DIR` and the same figures measure it (named draft_chat_vs_plain).
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path
from typing import Any

from bench.common import (
    bench_models,
    call_in_subprocess,
    emit,
    median,
    runner_env,
    warn_if_busy,
)
from bench.speculative import chat_messages


def worker(model_dir: str, draft_dir: str, rounds: int, tokens: int, prompts: int
           ) -> dict[str, Any]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from agent.generation import GenerationRequest, SamplingParams
    from agent.runtime.draft_model import load_draft_model
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import load_decoder
    from agent.runtime.scheduler import Scheduler, SchedulerLimits

    path = Path(model_dir)
    tokenizer = load_tokenizer(path)
    dec = load_decoder(path)
    draft = load_draft_model(Path(draft_dir), path, vocab=dec.config.vocab_size)
    schedulers = {}
    for drafted in (True, False):
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
        schedulers[drafted] = Scheduler(dec, tokenizer, kv, SchedulerLimits(), lambda e: None,
                                        prompt_lookup=False,
                                        draft_model=draft if drafted else None)

    def run(drafted: bool, prompt: list[int]) -> tuple[float, list[int]]:
        sched = schedulers[drafted]
        rid = f"r{secrets.token_hex(4)}"
        sched.submit(GenerationRequest(id=rid, model="smollm2", prompt_tokens=prompt,
                                       sampling=SamplingParams(max_tokens=tokens,
                                                               temperature=0.0)))
        seq = sched.running.get(rid)
        first: tuple[float, int] | None = None
        last = (0.0, 0)
        while not sched.idle:
            sched.step()
            seq = sched.running.get(rid) or seq
            if seq is None:
                continue
            now = time.perf_counter()
            if seq.generated >= 1 and first is None:
                first = (now, seq.generated)
            if seq.generated > last[1]:
                last = (now, seq.generated)
        assert first is not None and seq is not None
        return (last[1] - first[1]) / max(last[0] - first[0], 1e-9), list(seq.sampler.history)

    def encode(i: int, tag: str) -> list[int]:
        return list(tokenizer.apply_chat_template(chat_messages(i, tag),
                                                  add_generation_prompt=True))

    for drafted in (True, False):  # warm-up: compile the step shapes on other prompts
        run(drafted, encode(0, "warm"))
    on: list[float] = []
    off: list[float] = []
    identical = True
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        rates: dict[bool, list[float]] = {True: [], False: []}
        for i in range(prompts):
            prompt = encode(i, f"{r}-{secrets.token_hex(3)}")
            ids = {}
            for drafted in order:
                rate, ids[drafted] = run(drafted, prompt)
                rates[drafted].append(rate)
            identical &= ids[True] == ids[False]
        on.append(sum(rates[True]) / prompts)
        off.append(sum(rates[False]) / prompts)
    stats = schedulers[True].speculator.stats
    return {"on": on, "off": off, "identical": identical,
            "drafted": stats.model_drafted_tokens, "kept": stats.model_accepted_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="1 round, 48 tokens, 3 prompts")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--draft", type=Path, default=None,
                        help="a draft model directory (default: a random one, built here)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenBLAS threads of the worker (default: a runner's); on a busy "
                             "machine use 1 (wide verification matmuls collapse otherwise)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 1, 48
    warn_if_busy()
    _, model_dir = bench_models(args.models_dir)
    draft_figures(model_dir, args.draft, rounds=args.rounds, tokens=args.tokens,
                  prompts=3 if args.quick else 8, threads=args.threads)


def draft_figures(model_dir: Path, draft_dir: Path | None, *, rounds: int, tokens: int,
                  prompts: int, threads: int | None = None) -> None:
    """Measure and print the figures."""
    name = "draft"
    if draft_dir is None:
        import tempfile

        from tests.draft_models import make_smollm2_draft

        draft_dir = make_smollm2_draft(
            model_dir, Path(tempfile.gettempdir()) / "flock-bench-smollm2-random-draft")
        name = "draft_random"
    env, _ = runner_env(gemv=True, threads=threads)
    res = call_in_subprocess("bench.speculative_draft:worker",
                             {"model_dir": str(model_dir), "draft_dir": str(draft_dir),
                              "rounds": rounds, "tokens": tokens,
                              "prompts": prompts}, env, timeout=1800)
    ratios = [a / b for a, b in zip(res["on"], res["off"], strict=True)]
    emit(f"{name}_chat_vs_plain", median(ratios))
    emit(f"{name}_chat_vs_plain_runs", ", ".join(f"{x:.2f}" for x in ratios))
    emit(f"{name}_chat_tok_s", median(res["on"]), 1)
    emit("plain_chat_tok_s", median(res["off"]), 1)
    emit(f"{name}_acceptance", res["kept"] / max(res["drafted"], 1))
    emit("draft_greedy_ids_identical", res["identical"])


if __name__ == "__main__":
    main()

"""Speculative decoding (issue 14): prompt lookup vs plain decoding, side by side in one run.

    .venv/bin/python -m bench.speculative [--rounds 3] [--tokens 200] [--quick]

Prints `name: value` lines:
  lookup_edit_vs_plain         decode tok/s on the edit task (SmolLM2 asked to repeat a ~300-token
                               passage with one word changed), prompt lookup / plain, greedy
  lookup_greedy_ids_identical  every drafted run produced the plain run's ids (every task, round)
  lookup_chat_vs_plain         the same ratio over 8 fixed free chat prompts (run one by one)
  lookup_batch8_edit_vs_plain  8 concurrent edit streams (8 passages), aggregate decode tok/s:
                               their prompts are prefilled first (untimed, into a prefix cache
                               of the run's own), and the window runs from the moment every
                               stream is decoding to the last token, counting the tokens in it.
                               (Timed from the first stream's first token, as before session 7
                               and with --batch-with-prefill, the window held most of the
                               other seven prompts' prefill, one chunk a step beside the
                               decoding rows: the figure measured prefill as much as decode,
                               and streams that finished before the last one started.)
  batch8_edit_ramp_share       of the window from the first stream's first token to the last
                               token, the share before every stream was decoding
  lookup_acceptance_edit       mean drafted tokens kept per verification pass that carried a
                               draft (the model's own next token not counted), edit task
  *_tok_s                      the medians behind the ratios; *_runs the per-round ratios

Both configurations run flock's scheduler in one worker process with the environment a real
runner gets (the BLAS shim preloaded, `runner_environment`), over the same loaded decoder, and
alternate which goes first each round. Every timed prompt starts with a tag made for its round,
so nothing is served from an earlier round (the batch8 task prefills its own prompts first, see
above): the figures are decode. Both configurations decode the same prompts, so their greedy ids
are compared too. Each configuration warms up (compiles its step shapes) on other prompts first.
Decode tok/s counts the tokens after each stream's first one over the time from the first token
to the last (batch8: from the moment every stream is decoding).

Draft-model figures (draft_*) are `python -m bench.speculative_draft`'s.

  pipeline3_lookup_edit_vs_plain  the edit task on a 3-stage pipeline of local runner processes
                               (10/10/10 layers, TCP links, micro-batching on), prompt lookup /
                               plain: the pipeline is started once with each setting (runners
                               read it at start), the rounds alternate between the two. One
                               stream: its verify steps go round alone (stop-and-wait).
  pipeline3_lookup_batch4_edit_vs_plain  4 concurrent edit streams (the 2 passages, each twice
                               with a tag of its own) on the same
                               pipelines, aggregate decode tok/s: micro-batches in flight carry
                               their drafts round the ring (verify micro-batches). Unlike
                               lookup_batch8_edit_vs_plain's, the window runs from the first
                               stream's first token to the last one's last, so it holds the later
                               streams' prefill too (which drafting does not speed up).
Both pipeline figures are skipped with --no-pipeline; --only-pipeline runs nothing else.
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
    cpu_pressure,
    emit,
    median,
    runner_env,
    warn_if_busy,
)

PIPELINE_BATCH = 4  # concurrent edit streams of pipeline3_lookup_batch4_edit_vs_plain

PASSAGES = [
    ("river", "stream", """The river ran quietly past the old mill, carrying leaves and small
branches down toward the sea. Every morning the miller opened the great wooden doors and
listened to the water turning the wheel. He had worked there for forty years, and his father
before him, and the sound of the river was the first thing he heard each day and the last
thing he heard each night. In the spring the river rose and flooded the lower fields, and the
farmers came to complain, but the miller only shrugged and said that the river had been there
long before any of them and would be there long after they were gone. In the summer the water
fell low and slow, and children came to swim in the deep pool below the weir, shouting and
splashing until their mothers called them home for supper. In the autumn the river turned
brown with rain from the hills, and in the winter it sometimes froze at the edges, so that the
wheel creaked and groaned as it turned. The miller loved all of these seasons, and he could
not imagine living anywhere else in the world."""),
    ("garden", "yard", """Behind the small house there was a garden that nobody had tended for
many years. Tall grass grew between the stones of the path, and wild roses climbed over the
broken fence. When the new family moved in, the youngest daughter spent every afternoon in the
garden, pulling weeds and digging up the hard soil with an old spoon she had found in the
kitchen. Her brothers laughed at her, and her parents told her that the garden was too far gone
to save. But she kept working, day after day, and by the end of the summer she had cleared a
patch of ground near the back wall. She planted beans and tomatoes and a row of sunflowers, and
she watered them every evening with a bucket from the kitchen tap. The beans grew quickly and
climbed up the sticks she had tied together with string. The tomatoes turned red in the warm
sun, and the sunflowers grew taller than her father. By the autumn the whole family was eating
vegetables from the garden, and nobody laughed at her any more."""),
]

CHAT_PROMPTS = [
    "Write a short poem about the ocean at night.",
    "What are three good habits for staying healthy?",
    "Explain why the sky is blue in simple words.",
    "Give me an idea for a birthday party for a ten year old.",
    "What is the difference between a cat and a dog as a pet?",
    "Tell me a short story about a brave mouse.",
    "How do plants make their food?",
    "Suggest a name for a new coffee shop and say why.",
]


def edit_messages(index: int, tag: str) -> list[dict[str, str]]:
    old, new, text = PASSAGES[index % len(PASSAGES)]
    passage = " ".join(text.split())
    return [{"role": "system", "content": f"[{tag}] You are a careful copy editor."},
            {"role": "user", "content": f"Repeat the following passage exactly, word for word, "
                                        f"but replace the word \"{old}\" with \"{new}\".\n\n"
                                        f"{passage}"}]


def chat_messages(index: int, tag: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"[{tag}] You are a helpful AI assistant named "
                                          "SmolLM, trained by Hugging Face"},
            {"role": "user", "content": CHAT_PROMPTS[index % len(CHAT_PROMPTS)]}]


def worker(model_dir: str, rounds: int, tokens: int, quick: bool, primed_batch: bool = True
           ) -> dict[str, Any]:
    """Every task, both configurations, `rounds` interleaved rounds in this process."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from agent.generation import GenerationRequest, SamplingParams
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import load_decoder
    from agent.runtime.prefix import PrefixCache
    from agent.runtime.scheduler import Scheduler, SchedulerLimits

    path = Path(model_dir)
    tokenizer = load_tokenizer(path)
    dec = load_decoder(path)
    schedulers = {}
    for lookup in (True, False):
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
        schedulers[lookup] = Scheduler(dec, tokenizer, kv, SchedulerLimits(), lambda e: None,
                                       prompt_lookup=lookup)

    def encode(messages: list[dict[str, str]]) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def submit(sched: Any, prompts: list[list[int]], max_tokens: int) -> list[str]:
        ids = [f"r{secrets.token_hex(4)}" for _ in prompts]
        for rid, prompt in zip(ids, prompts, strict=True):
            sched.submit(GenerationRequest(id=rid, model="smollm2", prompt_tokens=prompt,
                                           sampling=SamplingParams(max_tokens=max_tokens,
                                                                   temperature=0.0)))
        return ids

    def run(lookup: bool, prompts: list[list[int]], max_tokens: int, *,
            primed: bool = False) -> dict[str, Any]:
        """Decode tok/s of `prompts` run together. `primed`: their prompts are prefilled first
        (untimed, one token each, into a prefix cache of this run's own), so that the timed
        streams start decoding together and the window holds decode only."""
        sched = schedulers[lookup]
        if primed:
            sched.prefix = PrefixCache(1 << 31)
            submit(sched, prompts, 1)
            while not sched.idle:
                sched.step()
        stats = sched.speculator.stats
        passes0, kept0 = stats.draft_passes, stats.accepted_tokens
        ids = submit(sched, prompts, max_tokens)
        seqs: dict[str, Any] = {}
        first: dict[str, tuple[float, int]] = {}
        last: dict[str, tuple[float, int]] = {}
        # Each stream's token count when the last one got its first token: the window starts
        # there, when every stream is decoding.
        at_all: dict[str, int] = {}
        all_decoding = 0.0
        while not sched.idle:
            sched.step()
            now = time.perf_counter()
            for rid in ids:
                seq = sched.running.get(rid) or seqs.get(rid)
                if seq is None:
                    continue
                seqs[rid] = seq
                if seq.generated >= 1 and rid not in first:
                    first[rid] = (now, seq.generated)
                if rid in first and seq.generated > last.get(rid, (0.0, 0))[1]:
                    last[rid] = (now, seq.generated)
            if not at_all and len(first) == len(ids):
                all_decoding = now
                at_all = {rid: seqs[rid].generated for rid in ids}
        sched.prefix = None
        start = all_decoding if primed else min(first[rid][0] for rid in ids)
        end = max(last[rid][0] for rid in ids)
        counted = at_all if primed else {rid: first[rid][1] for rid in ids}
        decoded = sum(last[rid][1] - counted[rid] for rid in ids)
        return {"tok_s": decoded / max(end - start, 1e-9),
                "ids": [seqs[rid].sampler.history for rid in ids],
                "passes": stats.draft_passes - passes0, "kept": stats.accepted_tokens - kept0,
                # Of the window from the first stream's first token to the last token, the
                # share before every stream was decoding (other streams' prefill).
                "ramp": (all_decoding - min(first[rid][0] for rid in ids))
                        / max(end - min(first[rid][0] for rid in ids), 1e-9)}

    tasks = {
        "edit": lambda tag: [encode(edit_messages(0, tag))],
        "chat": lambda tag: [encode(chat_messages(i, tag)) for i in range(8)],
        "batch8_edit": lambda tag: [encode(edit_messages(i, f"{tag}-{i}")) for i in range(8)],
    }
    if quick:
        tasks["chat"] = lambda tag: [encode(chat_messages(i, tag)) for i in range(3)]
    # Warm-up: every step shape (batch sizes, verification widths) compiles on other prompts.
    for lookup in (True, False):
        run(lookup, [encode(edit_messages(1, "warm"))], tokens)
        run(lookup, [encode(edit_messages(i, f"warm{i}")) for i in range(8)], 48,
            primed=True)
    results: dict[str, Any] = {name: {"on": [], "off": [], "passes": 0, "kept": 0,
                                      "identical": True, "ramp": []}
                               for name in tasks}
    for r in range(rounds):
        for name, prompts_for in tasks.items():
            order = (True, False) if r % 2 == 0 else (False, True)
            got = {}
            # A tag of the round's own: no prompt is seen twice (there is no prefix cache
            # either); both configurations decode the very same prompts, so their ids compare.
            prompts = prompts_for(f"{name}-{r}-{secrets.token_hex(3)}")
            for lookup in order:
                if name == "chat":
                    # One stream at a time: a person chatting.
                    outs = [run(lookup, [p], tokens) for p in prompts]
                    got[lookup] = {"tok_s": sum(o["tok_s"] for o in outs) / len(outs),
                                   "ids": [i for o in outs for i in o["ids"]],
                                   "passes": sum(o["passes"] for o in outs),
                                   "kept": sum(o["kept"] for o in outs)}
                else:
                    primed = primed_batch and name == "batch8_edit"
                    got[lookup] = run(lookup, prompts, tokens, primed=primed)
                    results[name]["ramp"].append(got[lookup]["ramp"])
            res = results[name]
            res["on"].append(got[True]["tok_s"])
            res["off"].append(got[False]["tok_s"])
            res["passes"] += got[True]["passes"]
            res["kept"] += got[True]["kept"]
            res["identical"] &= got[True]["ids"] == got[False]["ids"]
    return results


async def _pipeline_rates(model_dir: str, rounds: int, tokens: int) -> dict[str, Any]:
    """Edit-task decode tok/s through the head of a 3-stage pipeline, lookup on and off: one
    stream ("edit"), and PIPELINE_BATCH concurrent streams, aggregate ("batch4_edit")."""
    import asyncio
    import tempfile

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from agent.generation import GenerationRequest, SamplingParams, TokenChunk
    from agent.runtime.client import RunnerProcess
    from agent.runtime.environment import runner_environment
    from agent.settings import NodeSettings
    from tests.test_pipeline import pipeline_configs

    tokenizer = load_tokenizer(Path(model_dir))
    state = Path(tempfile.mkdtemp(prefix="flock-bench-spec-"))
    env, _ = runner_environment(NodeSettings(state_dir=state), ranks_on_this_machine=3)
    heads: dict[bool, RunnerProcess] = {}
    runners: list[RunnerProcess] = []
    try:
        for lookup in (True, False):
            configs = pipeline_configs(Path(model_dir), [(0, 10), (10, 20), (20, 30)],
                                       prompt_lookup=lookup)
            started = [RunnerProcess(c, env) for c in configs]
            runners += started
            await asyncio.gather(*(r.start(timeout=300) for r in started))
            heads[lookup] = started[0]

        async def stream(lookup: bool, index: int, tag: str, max_tokens: int
                         ) -> tuple[list[int], float, float, int]:
            prompt = list(tokenizer.apply_chat_template(edit_messages(index, tag),
                                                        add_generation_prompt=True))
            request = GenerationRequest(id=f"p{secrets.token_hex(4)}", model="smollm2",
                                        prompt_tokens=prompt,
                                        sampling=SamplingParams(max_tokens=max_tokens,
                                                                temperature=0.0))
            ids: list[int] = []
            first = last = 0.0
            first_count = 0
            async for event in heads[lookup].generate(request):
                if isinstance(event, TokenChunk) and event.token_ids:
                    now = time.perf_counter()
                    if not ids:
                        first, first_count = now, len(event.token_ids)
                    ids += event.token_ids
                    last = now
            return ids, first, last, first_count

        async def rate(lookup: bool, tag: str, max_tokens: int, streams: int = 1
                       ) -> tuple[float, list[list[int]]]:
            """Aggregate decode tok/s: the tokens after each stream's first one, over the time
            from the first stream's first token to the last stream's last."""
            outs = await asyncio.gather(*(stream(lookup, i, f"{tag}-{i}", max_tokens)
                                          for i in range(streams)))
            start = min(o[1] for o in outs)
            end = max(o[2] for o in outs)
            decoded = sum(len(o[0]) - o[3] for o in outs)
            return decoded / max(end - start, 1e-9), [o[0] for o in outs]

        tasks = {"edit": 1, f"batch{PIPELINE_BATCH}_edit": PIPELINE_BATCH}
        for lookup in (True, False):  # every shape (micro-batch rows, widths) compiles first
            await rate(lookup, "warm-pipeline", tokens)
            await rate(lookup, "warm-pipeline-batch", 48, PIPELINE_BATCH)
        results: dict[str, Any] = {name: {"on": [], "off": [], "identical": True}
                                   for name in tasks}
        for r in range(rounds):
            for name, streams in tasks.items():
                tag = f"pipeline-{name}-{r}-{secrets.token_hex(3)}"
                got = {}
                for lookup in ((True, False) if r % 2 == 0 else (False, True)):
                    got[lookup] = await rate(lookup, tag, tokens, streams)
                res = results[name]
                res["on"].append(got[True][0])
                res["off"].append(got[False][0])
                res["identical"] &= got[True][1] == got[False][1]
        stats = {lookup: dict(heads[lookup].last_stats) for lookup in heads}
        results["head_stats"] = {k: stats[True].get(k, 0.0) for k in (
            "verify_steps_total", "verify_microbatches_total", "draft_passes_total",
            "drafted_tokens_total", "accepted_draft_tokens_total")}
        return results
    finally:
        for runner in runners:
            await runner.stop()


def pipeline_worker(model_dir: str, rounds: int, tokens: int) -> dict[str, Any]:
    import asyncio

    return asyncio.run(_pipeline_rates(model_dir, rounds, tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 64 tokens, 3 chat prompts (a few minutes)")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenBLAS threads of the in-process worker (default: a runner's)")
    parser.add_argument("--batch-with-prefill", action="store_true",
                        help="time the batch8 streams from the first one's first token, the "
                             "other streams' prefill included (the figure before session 7)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="skip the pipeline3_* figures")
    parser.add_argument("--only-pipeline", action="store_true",
                        help="only the pipeline3_* figures")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 1, 64
    warn_if_busy()
    emit("cpu_pressure_avg60_start", cpu_pressure() or 0.0)
    _, model_dir = bench_models(args.models_dir)
    # On a busy machine use --threads 1: multi-threaded sgemm (the verification pass's wide
    # matmuls) collapses when its threads wait for cores, while one-row decode does not.
    env, _ = runner_env(gemv=True, threads=args.threads)
    identical = True
    if not args.only_pipeline:
        identical = _single_node(args, model_dir, env)
    if not args.no_pipeline:
        identical &= _pipeline(args, model_dir, env)
    emit("lookup_greedy_ids_identical", identical)
    emit("cpu_pressure_avg60_end", cpu_pressure() or 0.0)


def _single_node(args: argparse.Namespace, model_dir: Path, env: dict[str, str]) -> bool:
    """The one-node figures; whether every drafted run gave the plain run's ids."""
    results = call_in_subprocess("bench.speculative:worker",
                                 {"model_dir": str(model_dir), "rounds": args.rounds,
                                  "tokens": args.tokens, "quick": args.quick,
                                  "primed_batch": not args.batch_with_prefill}, env,
                                 timeout=1800)
    for name, figure in (("edit", "lookup_edit_vs_plain"), ("chat", "lookup_chat_vs_plain"),
                         ("batch8_edit", "lookup_batch8_edit_vs_plain")):
        res = results[name]
        ratios = [a / b for a, b in zip(res["on"], res["off"], strict=True)]
        emit(figure, median(ratios))
        emit(f"{figure}_runs", ", ".join(f"{x:.2f}" for x in ratios))
        emit(f"{name}_lookup_tok_s", median(res["on"]), 1)
        emit(f"{name}_plain_tok_s", median(res["off"]), 1)
    emit("batch8_edit_ramp_share", median(results["batch8_edit"]["ramp"]))
    edit = results["edit"]
    emit("lookup_acceptance_edit", edit["kept"] / max(edit["passes"], 1))
    return all(results[name]["identical"] for name in results)


def _pipeline(args: argparse.Namespace, model_dir: Path, env: dict[str, str]) -> bool:
    """The 3-stage pipeline figures; whether every drafted run gave the plain run's ids."""
    pipe = call_in_subprocess("bench.speculative:pipeline_worker",
                              {"model_dir": str(model_dir), "rounds": args.rounds,
                               "tokens": args.tokens}, {**env, "FLOCK_BLAS_GEMV": "1"},
                              timeout=1800)
    identical = True
    for name in ("edit", f"batch{PIPELINE_BATCH}_edit"):
        res = pipe[name]
        figure = f"pipeline3_lookup_{name}_vs_plain"
        ratios = [a / b for a, b in zip(res["on"], res["off"], strict=True)]
        emit(figure, median(ratios))
        emit(f"{figure}_runs", ", ".join(f"{x:.2f}" for x in ratios))
        emit(f"pipeline3_{name}_lookup_tok_s", median(res["on"]), 1)
        emit(f"pipeline3_{name}_plain_tok_s", median(res["off"]), 1)
        identical &= res["identical"]
    for key, value in pipe["head_stats"].items():
        emit(f"pipeline3_lookup_{key}", value, 0)
    return identical


if __name__ == "__main__":
    main()

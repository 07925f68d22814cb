"""Cluster throughput figures of issue 13 (every node of a cluster working at once).

    .venv/bin/python -m bench.cluster_throughput [--only pipeline,...] [--quick]
        [--rounds 3] [--tokens 96]

Prints `name: value` lines. Sections (`--only` picks some; default all):

  pipeline   pipelined micro-batches on SmolLM2 (float32, flock's engine), runner processes on
             loopback, each pinned with `taskset` to its own core with one BLAS thread (the
             bench client unpinned); greedy; every round's prompts are fresh random ids (no
             prefix-cache hits); configurations alternate within each round, medians:
    ceiling_16_over_8                 one runner on core 0: 2 x aggregate decode tok/s of 8
                                      streams / of 16 streams (what spreading 16 streams over
                                      two cores can give at most)
    pipeline2_multi_vs_single         16 streams on a 2-stage pipeline (stage i on core i) /
                                      the same 16 on one runner on core 0
    pipeline2_multi_vs_ceiling        the above / ceiling_16_over_8 (target >= 0.85)
    pipeline2_microbatch_vs_stopwait  16 streams, micro-batching on / off (>= 1.35)
    pipeline2_*_stage<i>_busy         each stage's busy seconds (the head's stage stats) per
                                      wall second of those 16 streams: the stage profile
    pipeline2_single_vs_single        one stream's decode tok/s, pipeline / one runner (>= 0.9)
    prefill2k_pipeline2_vs_single     time to first token of a 2,000-token prompt, pipeline /
                                      one runner (<= 0.65)
    greedy_ids_identical              every stream's ids equal one runner's, in every
                                      configuration of every round
  (replicas and hetero sections: added by their own helpers, same shape: a function taking the
  parsed arguments and printing its lines, registered in SECTIONS.)

Aggregate decode tok/s counts every token streamed between the last stream's first token and
the first stream's last token (all streams decoding at once) over that window.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import bench_models, emit, warn_if_busy  # noqa: E402

# ---- shared: pinned runners and timed streams -------------------------------------------------


def pin(pid: int, core: int) -> None:
    """Every thread of `pid` onto `core` (threads it starts later inherit it)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True,
                   capture_output=True)


async def start_pinned(configs: list[Any], cores: list[int], state: Path) -> list[Any]:
    """Runner processes (one BLAS thread each) started together, then each pinned to its core."""
    from agent.runtime.client import RunnerProcess
    from agent.runtime.environment import runner_environment
    from agent.settings import NodeSettings

    env, _ = runner_environment(NodeSettings(state_dir=state, blas_threads=1))
    runners = [RunnerProcess(c, env) for c in configs]
    await asyncio.gather(*(r.start(timeout=600) for r in runners))
    for runner, core in zip(runners, cores, strict=True):
        assert runner.pid is not None
        pin(runner.pid, core)
    return runners


@dataclass
class Stream:
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each chunk's tokens arrived
    counts: list[int] = field(default_factory=list)
    submitted: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.times[0] - self.submitted

    @property
    def decode_tok_s(self) -> float:
        tokens = sum(self.counts) - self.counts[0]
        return tokens / max(self.times[-1] - self.times[0], 1e-9)


async def stream(runner: Any, rid: str, prompt: list[int], n: int) -> Stream:
    from agent.generation import (
        Finished,
        GenerationRequest,
        SamplingParams,
        TokenChunk,
    )

    request = GenerationRequest(id=rid, model="bench", prompt_tokens=prompt,
                                sampling=SamplingParams(max_tokens=n, temperature=0.0))
    out = Stream(submitted=time.perf_counter())
    async for event in runner.generate(request):
        if isinstance(event, TokenChunk) and event.token_ids:
            out.ids += event.token_ids
            out.times.append(time.perf_counter())
            out.counts.append(len(event.token_ids))
        elif not isinstance(event, TokenChunk) and (
                not isinstance(event, Finished) or not out.ids):
            raise RuntimeError(f"stream {rid} ended badly: {event}")
    return out


def aggregate_tok_s(streams: list[Stream]) -> float:
    """Tokens streamed while every stream was decoding, per second of that window."""
    start = max(s.times[0] for s in streams)
    stop = min(s.times[-1] for s in streams)
    if stop <= start:
        raise RuntimeError("the streams never all decoded at once; raise --tokens")
    tokens = sum(c for s in streams for t, c in zip(s.times, s.counts, strict=True)
                 if start < t <= stop)
    return tokens / (stop - start)


def fresh_prompts(rng: random.Random, count: int, length: int) -> list[list[int]]:
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(count)]


async def concurrent(runner: Any, prompts: list[list[int]], n: int, tag: str) -> list[Stream]:
    return list(await asyncio.gather(*(stream(runner, f"{tag}-{i}", p, n)
                                       for i, p in enumerate(prompts))))


# ---- pipeline: micro-batches in flight around a 2-stage ring ------------------------------------


def head_layers(config: dict[str, Any]) -> int:
    """Layers for the head of a 2-stage pipeline: half. The head and the last stage share
    decode's vocabulary projection (`agent/runtime/vocab_split.py`, balanced for the split), so
    an even split evens both decode and prefill (one row projected per prompt)."""
    return max(1, config["num_hidden_layers"] // 2)


def pipeline_configs(model_dir: Path, *, microbatch: bool, layers: int, half: int) -> list[Any]:
    from agent.runtime.protocol import RunnerConfig
    from tests.live_agent import free_port

    ports = [free_port(), free_port()]
    common = {"model_name": "bench", "model_dir": str(model_dir), "max_batch": 16,
              "context_length": 4096, "pipeline_microbatch": microbatch,
              "prompt_lookup": False,  # plain decode: drafting has its own bench
              "stats_interval_s": 0.25}  # the stage busy figures read the head's stats
    return [RunnerConfig(role="head", layer_start=0, layer_stop=half,
                         listen=f"127.0.0.1:{ports[0]}", downstream=f"127.0.0.1:{ports[1]}",
                         **common),
            RunnerConfig(role="follower", layer_start=half, layer_stop=layers,
                         listen=f"127.0.0.1:{ports[1]}", downstream=f"127.0.0.1:{ports[0]}",
                         **common)]


async def pipeline_rounds(model_dir: Path, rounds: int, n: int, state: Path,
                          half: int | None) -> dict[str, Any]:
    import json

    from agent.runtime.protocol import RunnerConfig

    config = json.loads((model_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    half = head_layers(config) if half is None else half
    print(f"# 2-stage split: {half} + {layers - half} layers", file=sys.stderr, flush=True)
    single_config = RunnerConfig(model_name="bench", model_dir=str(model_dir), max_batch=16,
                                 context_length=4096, prompt_lookup=False)
    sets = {
        "single": await start_pinned([single_config], [0], state),
        "on": await start_pinned(pipeline_configs(model_dir, microbatch=True, layers=layers,
                                                  half=half),
                                 [0, 1], state),
        "off": await start_pinned(pipeline_configs(model_dir, microbatch=False, layers=layers,
                                                   half=half),
                                  [0, 1], state),
    }
    heads = {name: runners[0] for name, runners in sets.items()}
    figures: dict[str, list[float]] = {k: [] for k in (
        "single8", "single16", "on16", "off16", "single1", "on1", "ttft_single", "ttft_on")}
    identical = True
    rng = random.Random(13)
    try:
        # Warm-up: compile every shape the rounds meet (batch sizes, micro-batch ranges).
        warm = fresh_prompts(rng, 16, 12)
        for name, head in heads.items():
            # Long enough that all 16 decode at once (the timed window's micro-batch shapes).
            await concurrent(head, warm, 32, f"warm-{name}")
            await concurrent(head, warm[:8], 16, f"warm8-{name}")  # the 8-row shapes too
            await stream(head, f"warm1-{name}", warm[0], 4)
        for r in range(rounds):
            eight, sixteen = fresh_prompts(rng, 8, 12), fresh_prompts(rng, 16, 12)
            one = fresh_prompts(rng, 1, 12)[0]
            long_prompt = fresh_prompts(rng, 1, 2000)[0]
            figures["single8"].append(aggregate_tok_s(
                await concurrent(heads["single"], eight, n, f"s8-{r}")))
            ids: dict[str, list[list[int]]] = {}
            for name in ("single", "on", "off"):
                before = await settled_stats(heads[name])
                started = time.perf_counter()
                streams = await concurrent(heads[name], sixteen, n, f"{name}16-{r}")
                figures[f"{name}16"].append(aggregate_tok_s(streams))
                ids[name] = [s.ids for s in streams]
                if name != "single":  # each stage's busy share of the 16 streams' wall time
                    after = await settled_stats(heads[name])
                    wall = time.perf_counter() - started
                    for stage in range(2):
                        key = f"stage_busy_seconds_total_{stage}"
                        figures.setdefault(f"busy_{name}_{stage}", []).append(
                            (after.get(key, 0.0) - before.get(key, 0.0)) / wall)
            identical &= ids["single"] == ids["on"] == ids["off"]
            alone = {name: await stream(heads[name], f"{name}1-{r}", one, n)
                     for name in ("single", "on")}
            figures["single1"].append(alone["single"].decode_tok_s)
            figures["on1"].append(alone["on"].decode_tok_s)
            identical &= alone["single"].ids == alone["on"].ids
            prefill = {name: await stream(heads[name], f"{name}2k-{r}", long_prompt, 2)
                       for name in ("single", "on")}
            figures["ttft_single"].append(prefill["single"].ttft_s)
            figures["ttft_on"].append(prefill["on"].ttft_s)
            identical &= prefill["single"].ids == prefill["on"].ids
    finally:
        for runners in sets.values():
            for runner in runners:
                await runner.stop()
    out: dict[str, Any] = {k: statistics.median(v) for k, v in figures.items()}
    out["identical"] = identical
    return out


async def settled_stats(runner: Any) -> dict[str, float]:
    """The runner's stats once a report newer than now has arrived (its interval is short)."""
    last = runner.last_stats
    deadline = time.perf_counter() + 5
    while runner.last_stats is last and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    return dict(runner.last_stats)


def pipeline_figures(args: argparse.Namespace) -> None:
    import tempfile

    _, model_dir = bench_models()
    with tempfile.TemporaryDirectory(prefix="flock-bench-throughput-") as tmp:
        m = asyncio.run(pipeline_rounds(model_dir, args.rounds, args.tokens, Path(tmp),
                                        args.head_layers))
    ceiling = 2 * m["single8"] / m["single16"]
    multi = m["on16"] / m["single16"]
    emit("single_8_streams_tok_s", m["single8"])
    emit("single_16_streams_tok_s", m["single16"])
    emit("pipeline2_16_streams_tok_s", m["on16"])
    emit("pipeline2_stopwait_16_streams_tok_s", m["off16"])
    emit("ceiling_16_over_8", ceiling, 3)
    emit("pipeline2_multi_vs_single", multi, 3)
    emit("pipeline2_multi_vs_ceiling", multi / ceiling, 3)
    emit("pipeline2_microbatch_vs_stopwait", m["on16"] / m["off16"], 3)
    for name in ("on", "off"):  # the profile: how busy each stage was over the 16 streams
        for stage in range(2):
            emit(f"pipeline2_{'microbatch' if name == 'on' else 'stopwait'}_stage{stage}_busy",
                 m.get(f"busy_{name}_{stage}", float("nan")), 3)
    emit("single_1_stream_tok_s", m["single1"])
    emit("pipeline2_1_stream_tok_s", m["on1"])
    emit("pipeline2_single_vs_single", m["on1"] / m["single1"], 3)
    emit("prefill2k_single_ttft_s", m["ttft_single"], 3)
    emit("prefill2k_pipeline2_ttft_s", m["ttft_on"], 3)
    emit("prefill2k_pipeline2_vs_single", m["ttft_on"] / m["ttft_single"], 3)
    emit("greedy_ids_identical", bool(m["identical"]))


# ---- replicas: load-aware routing and scale on load (bench/cluster_replicas.py) ----------------

def replicas_section(args: argparse.Namespace) -> None:
    """Two replicas behind real agents (their ratio is held against a ceiling the agents measure
    themselves, printed as ceiling_16_over_8_agents when the pipeline section ran too), then
    scale on load."""
    from bench.cluster_replicas import autoscale_figure, throughput_figures

    models, model_dir = bench_models()
    figures = throughput_figures(models, model_dir, args.rounds, min(args.tokens, 64))
    ceiling_name = ("ceiling_16_over_8_agents" if "pipeline" in args.only
                    else "ceiling_16_over_8")
    emit(ceiling_name, figures["ceiling_16_over_8"], 3)
    for name in ("replicas2_multi_vs_ceiling", "replicas2_multi_vs_single",
                 "independent2_multi_vs_ceiling", "replicas2_share_of_replica_1"):
        emit(name, figures[name], 3)
    scaled = autoscale_figure(models, min(args.tokens, 64))
    for name in ("autoscale_second_replica_s", "autoscale_decision_s"):
        if name in scaled:
            emit(name, scaled[name], 1)


# ---- hetero: speed-aware placement (bench/cluster_hetero.py) -----------------------------------

def hetero_section(args: argparse.Namespace) -> None:
    """A fast node and one held to 35% of a core: speed-aware vs memory-proportional placement."""
    from bench.cluster_hetero import hetero_figures

    models, model_dir = bench_models()
    for name, value in hetero_figures(models, model_dir, rounds=args.rounds,
                                      n=min(args.tokens, 64)).items():
        emit(name, value)


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "pipeline": pipeline_figures,
    "replicas": replicas_section,
    "hetero": hetero_section,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections ({', '.join(SECTIONS)})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96, help="tokens per stream")
    parser.add_argument("--head-layers", type=int, default=None,
                        help="layers on the pipeline head (default: see head_layers)")
    parser.add_argument("--quick", action="store_true", help="one round of 48 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens = 1, 48
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    warn_if_busy()
    for name in chosen:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
